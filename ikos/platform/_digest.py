"""SHA-256 from CPython's built-in module, not through ``hashlib``.

ikosd names things by a short SHA-256 of a path or a source (cgroups, the
compiled helpers, the recovery marker) at every start. ``hashlib`` loads
OpenSSL's libcrypto to do it, megabytes of ikosd's private memory for a few
hashes of a hundred bytes; the interpreter's own ``_sha256`` (``_sha2``
since Python 3.12) gives the same digests without it. ``hashlib`` is the
fallback where the built-in module is missing. The digests must not change:
they name cgroups and caches that a later ikosd finds again.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...


class _Constructor(Protocol):
    def __call__(self, data: bytes = ..., /) -> _Hash: ...


def _builtin_sha256() -> _Constructor:
    for name in ("_sha2", "_sha256"):
        try:
            return cast(_Constructor, importlib.import_module(name).sha256)
        except (ImportError, AttributeError):
            continue
    import hashlib

    return cast(_Constructor, hashlib.sha256)


#: ``sha256(data)``, as ``hashlib.sha256``.
sha256: _Constructor = _builtin_sha256()
