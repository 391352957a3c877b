"""An actor's counters, in a page of shared memory that the manager reads at scrape time.

Actors live in their own processes, so the manager cannot see their
mailboxes. Asking each actor for its figures at every scrape would put the
manager on the data path, wake idle actors and stall a scrape behind a busy
one. Instead the manager creates a small memfd per incarnation, sealed
against shrinking and growing (so that the actor cannot make a read of the
manager's mapping fault), hands it to the actor with its other descriptors
and deposits it with the descriptor keeper; the actor is the only writer,
the manager maps it read-only and reads it when Prometheus scrapes, without
a message. A memfd has no name: nothing is left behind when the actor and
the manager let go of it, whoever dies first (see ``ikos.platform._memfd``).

The layout is fixed: :data:`SLOTS` native 64-bit unsigned integers, each
written by one store (``memoryview.cast("Q")``), so a reader sees every
counter either before or after an update, never half of one. The counters:

* ``received``: messages put in the mailbox, ``taken``: messages taken out
  of it to be handled; the depth is their difference (read ``taken`` first,
  so that it is never negative). Messages still in the sockets' kernel
  buffers, not yet read by the actor, are not in it.
* the ask-duration histogram: for every ask, the nanoseconds from taking it
  off the mailbox to sending its reply (the actor's service time; the
  caller's round trip adds the socket both ways), as a sum and one count per
  bucket of :data:`ASK_BUCKETS` (not cumulative: the reader adds them up, so
  that its ``_count`` always equals its ``+Inf`` bucket).

Updating costs an increment or two per message (about 0.1 µs in CPython).
The counters start at zero with each incarnation of the actor (a new memfd)
and continue when a new ikosd adopts a running actor (the keeper gives the
memfd back), as Prometheus expects of a counter that resets with its process.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

#: Upper bounds (seconds) of the ask-duration buckets: 10 µs to 10 s.
ASK_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: The same bounds in integer nanoseconds, for ``bisect`` on the hot path.
ASK_BUCKETS_NS: tuple[int, ...] = tuple(round(b * 1e9) for b in ASK_BUCKETS)

# Slot indices.
TAKEN, RECEIVED, ASK_SUM_NS, FIRST_BUCKET = 0, 1, 2, 3  # TAKEN first: see read_figures
#: Slots in all: three counters, a bucket per bound and one past the last (+Inf).
SLOTS = FIRST_BUCKET + len(ASK_BUCKETS) + 1
SIZE = SLOTS * 8
_LAYOUT = struct.Struct(f"={SLOTS}Q")
#: The memfd's name, as ``/proc/PID/fd`` shows it (``/memfd:ikos-actor-stats``).
MEMFD_NAME = "ikos-actor-stats"
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@dataclass(frozen=True)
class ActorFigures:
    """One actor's counters as read at one instant."""

    mailbox_depth: int
    messages: int
    ask_sum_seconds: float
    #: cumulative counts per bucket of :data:`ASK_BUCKETS`, then the ``+Inf`` one
    ask_buckets: tuple[int, ...]

    @property
    def ask_count(self) -> int:
        return self.ask_buckets[-1]


def create_stats_fd() -> int:
    """A new zeroed, sealed memfd of :data:`SIZE` bytes (close-on-exec)."""
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_for_reading(fd: int) -> mmap.mmap | None:
    """Map the memfd ``fd`` read-only (the mapping keeps its own descriptor; ``fd`` stays
    the caller's); None when it is not a region of this layout, sealed as made here."""
    try:
        if os.fstat(fd).st_size != SIZE:
            return None
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            return None
        return mmap.mmap(fd, SIZE, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


def map_for_writing(fd: int) -> memoryview:
    """The actor's view of its counters: ``view[slot] += 1`` is one 64-bit store.

    ``fd`` is consumed (the mapping does not need it). An unusable descriptor
    gives private counters nobody reads rather than an actor that cannot start.
    """
    try:
        region: mmap.mmap | bytearray = mmap.mmap(fd, SIZE, access=mmap.ACCESS_WRITE)
    except (OSError, ValueError):
        region = bytearray(SIZE)
    finally:
        os.close(fd)
    return memoryview(region).cast("Q")


def private_counters() -> memoryview:
    """Counters for an actor run without a manager reading them."""
    return memoryview(bytearray(SIZE)).cast("Q")


def read_figures(region: mmap.mmap) -> ActorFigures | None:
    """The counters in ``region`` now; None once the mapping is closed."""
    try:
        slots = _LAYOUT.unpack_from(region)
    except (ValueError, struct.error):
        return None
    # a message is received before it is taken, and ``unpack_from`` reads the
    # slots in order, ``taken`` first: the difference is never negative even when
    # an update falls between the two reads (max() guards a hostile writer)
    taken, received = slots[TAKEN], slots[RECEIVED]
    cumulative, total = [], 0
    for count in slots[FIRST_BUCKET:]:
        total += count
        cumulative.append(total)
    return ActorFigures(max(0, received - taken), taken, slots[ASK_SUM_NS] / 1e9, tuple(cumulative))
