"""Giving the C heap's free memory back to the kernel after a burst of work.

A wave of starts or stops (500 daemons at boot, a ``stop`` of a subtree)
allocates and frees many short-lived objects at once. glibc keeps what was
freed: only the top of the heap is returned on its own, and free pages
between live allocations stay in ikosd's resident memory until
``malloc_trim`` hands them back (``MADV_DONTNEED``). Measured on a real ikosd
of 500 executables: 1.2 MiB less with 0 daemons and 3 MiB less with 500
(``docs/performance.md``, "Memory").

:class:`HeapTrimmer` runs ``malloc_trim(0)`` once a burst is over: the
first event arms a timer of :data:`DELAY` seconds, later events within it
ride on the same timer, so a steady stream of restarts trims at most once a
:data:`DELAY` and an idle ikosd never. On a C library without
``malloc_trim`` (musl) it does nothing. ``ctypes`` is loaded at the first
trim, not at ikosd's start.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Final

#: Seconds between the first event of a burst and the trim.
DELAY: Final = 1.0


@functools.cache
def _load_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None
    trim.argtypes = [ctypes.c_size_t]  # type: ignore[attr-defined]
    trim.restype = ctypes.c_int  # type: ignore[attr-defined]
    return trim


class HeapTrimmer:
    """Trim the C heap :data:`DELAY` seconds after the first of a burst of events."""

    def __init__(self, delay: float = DELAY) -> None:
        self.delay = delay
        self.trims = 0
        self._timer: asyncio.TimerHandle | None = None
        self._unavailable = False  # no malloc_trim here: found at the first trim

    def poke(self) -> None:
        """Something allocated and freed a lot: trim soon (once for the whole burst)."""
        if self._timer is None and not self._unavailable:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._run)

    def _run(self) -> None:
        self._timer = None
        trim = _load_trim()
        if trim is None:
            self._unavailable = True
            return
        trim(0)
        self.trims += 1

    def close(self) -> None:
        """Cancel a pending trim."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
