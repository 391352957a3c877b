"""Shared buffers for ``ikos.ipc``: the platform's memfd-backed buffer, under its IPC name.

A :class:`SharedBuffer` is filled in place and then sent (to an actor, a
service, a topic) without any copy: its memfd's descriptor is passed. The
implementation lives in ``ikos.platform._memfd``; this module only gives it
its place in the public IPC layer.
"""

from __future__ import annotations

from ikos.platform._memfd import SharedBuffer, shared_buffer

__all__ = ["SharedBuffer", "shared_buffer"]
