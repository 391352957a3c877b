"""asyncio in ikosd without ``ssl`` until something asks for TLS.

``import asyncio`` imports ``ssl``, which maps OpenSSL's libssl and libcrypto:
4.5 MiB of ikosd's private memory (measured standalone, by mapping) and a few
milliseconds of its start, for a manager that speaks TLS in one place only,
an ``https://`` health check. asyncio's modules import ``ssl`` inside
``try/except ImportError`` and bind ``ssl = None`` without it, so ikosd's
command imports asyncio with ``ssl`` blocked (:func:`import_asyncio_without_tls`)
and then unblocks it: a later ``import ssl`` works as ever, and the first
TLS connection of the loop is preceded by :func:`enable_asyncio_tls`, which
gives asyncio the real module. This is the only place that does either.

Only ikosd's own command (and the private ikosd of ``ikos.local()``) takes
this path, before anything else imported asyncio; a program that imports
``ikos`` (``ikos.run`` included) gets asyncio as it always was.

Rejected: leaving asyncio as it is (libcrypto stays the largest library in
ikosd's memory), and patching asyncio's ``ssl`` names at import instead of
blocking the import (the modules also define TLS-only names under ``if ssl
is not None``, which a reload of ``asyncio.sslproto`` defines again here).
"""

from __future__ import annotations

import importlib
import sys
import threading

_lock = threading.Lock()


def import_asyncio_without_tls() -> bool:
    """Import asyncio without ``ssl``, unless it is imported already; True if it was done.

    ``import ssl`` keeps working afterwards (the block is lifted at once);
    asyncio itself has no TLS until :func:`enable_asyncio_tls`.
    """
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]  # makes `import ssl` raise ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
    return True


def enable_asyncio_tls() -> None:
    """Give asyncio the ``ssl`` module if it was imported without it (idempotent, thread-safe).

    Call it before a TLS connection on the loop (``open_connection(ssl=...)``).
    """
    import asyncio.sslproto as sslproto

    if getattr(sslproto, "ssl", None) is not None:
        return
    with _lock:
        if getattr(sslproto, "ssl", None) is not None:
            return
        import ssl

        # sslproto defines its TLS-only names when it is imported with ssl
        importlib.reload(sslproto)
        for name, module in list(sys.modules.items()):
            if name.startswith("asyncio.") and getattr(module, "ssl", False) is None:
                setattr(module, "ssl", ssl)  # noqa: B010  (a module's global)
