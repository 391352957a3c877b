"""Python's cyclic collector during ikosd's start: held off, then frozen.

Apart from :mod:`ikos.platform._heap` because ikosd's ``main()`` holds it
before anything else is imported, asyncio included (see
:mod:`ikos.platform._asyncio_tls`).
"""

from __future__ import annotations

import gc

_gc_held = False


def hold_gc() -> None:
    """Keep Python's cyclic collector off while ikosd starts (until :func:`release_gc`).

    ikosd's imports and start make some 40,000 long-lived objects and almost no
    garbage (448 unreachable objects after the imports): the 40-odd collections
    the allocations set off scanned them for nothing, 6 ms of the launch.
    """
    global _gc_held
    if gc.isenabled():
        gc.disable()
        _gc_held = True


def release_gc() -> None:
    """ikosd answers: freeze what its start made and turn the collector back on.

    Frozen objects are never scanned again (``gc.freeze``), so later collections
    cost what ikosd makes while it runs, not what it is made of; the start's few
    cycles of garbage stay, a few kilobytes. A no-op unless :func:`hold_gc` held it:
    an embedding program's collector is left as it was.
    """
    global _gc_held
    if _gc_held:
        _gc_held = False
        gc.freeze()
        gc.enable()
