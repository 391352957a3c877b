"""Sealed memfds: how a large payload crosses processes without going through a socket.

A payload above the shared-memory threshold is written once into an anonymous
memfd, sealed so that nobody can change its size or contents any more, and its
descriptor travels with the message over SCM_RIGHTS; the receiver maps it
read-only and hands out a ``memoryview`` of the mapping (zero copy). The
rejected alternative, named segments in ``/dev/shm``, needs a name, a cleanup
protocol and a reaper for the segments of processes that died mid-way; a
memfd has no name, and the kernel frees it when the last descriptor or
mapping of it goes, whoever dies.

Seals are what make a descriptor from another process safe to map: a peer
able to shrink the file under our mapping would make us die of SIGBUS on the
next read, so :func:`check_segment` refuses any descriptor that is not a
regular shmem file of exactly the announced size sealed against shrinking.

A mapping is a :class:`SharedBuffer` (an ``mmap`` that also keeps its memfd's
descriptor): the received ``memoryview``'s ``obj`` is one, so the view can be
forwarded again by passing the same descriptor, without a copy. The price is
one descriptor per live mapping (plus the duplicate ``mmap`` keeps), released
when the last view of it is garbage. :func:`shared_buffer` makes a writable
one for a sender that fills the payload in place and sends it without any
copy at all.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import stat
from collections import deque
from collections.abc import Iterable
from typing import Any

#: Bytes-like payloads from this size up travel in a memfd (bench/shm.py measures why).
DEFAULT_SHM_THRESHOLD = 256 << 10
#: Descriptors a connection may hold received but not yet matched to their frame.
MAX_PENDING_FDS = 8
#: Ancillary room for one recvmsg: a frame carries at most one descriptor, and the kernel
#: stops a stream recvmsg after the first message that carried some; room for a few more
#: only so that a peer sending extra ones is seen (and closed) rather than truncated.
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_PENDING_FDS * 4)
#: Flags of every recvmsg that may bring descriptors: never leak one into an exec.
#: Plain ints, not the socket module's IntFlag members: a ``flags & socket.MSG_CTRUNC``
#: runs enum code, about 0.6 µs, on every read of the hot path.
RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
MSG_CTRUNC = int(socket.MSG_CTRUNC)
SEALS_FROZEN = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
SEALS_SIZED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_WRITE_CHUNK = 1 << 30  # os.write of more than 2 GiB is cut short on Linux anyway


def _memfd(name: str) -> int:
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def create_segment(data: bytes | bytearray | memoryview) -> int:
    """A new sealed memfd holding a copy of ``data``; the caller owns (closes) the fd.

    The seals (shrink, grow, write, seal) make it immutable: any receiver may
    map it without fearing SIGBUS or a change behind its back.
    """
    view = memoryview(data).cast("B")
    if not view.nbytes:
        raise ValueError("a shared-memory segment cannot be empty")
    fd = _memfd("ikos-shm")
    try:
        # os.write into tmpfs is one copy; ftruncate + mmap + memcpy would add a
        # page fault per 4 KiB page on top of the same copy.
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done : done + _WRITE_CHUNK])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS_FROZEN)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_segment(fd: int, size: int) -> None:
    """Raise ValueError unless ``fd`` is a memfd-like file of ``size`` bytes sealed
    at least against shrinking (so that mapping it cannot end in SIGBUS)."""
    if size <= 0:
        raise ValueError(f"a shared-memory segment must have a positive size, not {size}")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ValueError(f"descriptor {fd} is not usable: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"descriptor {fd} is not a regular file (mode {st.st_mode:#o})")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ValueError(f"descriptor {fd} is not a memfd (it cannot carry seals)") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ValueError(
            f"descriptor {fd} is a memfd not sealed against shrinking (seals {seals:#x}): "
            "its owner could truncate it under the mapping"
        )
    if st.st_size != size:
        raise ValueError(f"descriptor {fd} holds {st.st_size} bytes, the frame announced {size}")


class SharedBuffer(mmap.mmap):
    """An ``mmap`` of a memfd that keeps the memfd's descriptor, so it can be sent as is.

    Made writable by :func:`shared_buffer` (fill it, then send it: its
    descriptor is passed, nothing is copied), or read-only by
    :func:`map_segment` for a received payload. It behaves like any ``mmap``
    (slicing, slice assignment, ``memoryview(buf)``, ``len``). The descriptor is
    closed by :meth:`close` or when the object is garbage collected.

    Writes made after sending are visible to the receiver: it is the same
    memory. Fill it first, then send it.
    """

    fd: int

    def __new__(cls, fd: int, size: int, *, writable: bool) -> SharedBuffer:
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        self = super().__new__(cls, fd, size, access=access)
        self.fd = fd
        return self

    def close(self) -> None:
        """Unmap and close the descriptor (BufferError while views of it are alive)."""
        super().close()
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close_quietly(fd)

    def __del__(self) -> None:
        self._close_fd()

    def __reduce__(self) -> Any:
        # nested inside another value it travels by copy, like any bytes-like value
        return (bytes, (bytes(self),))

    def __repr__(self) -> str:
        return f"<SharedBuffer fd={self.fd} size={len(self)}>"


def shared_buffer(size: int) -> SharedBuffer:
    """A writable buffer of ``size`` bytes in shared memory, sent without any copy.

    Example::

        buf = shared_buffer(64 << 20)
        buf[:] = produce()            # or memoryview(buf), buf.write(...)
        ref.ask(buf)                  # the receiver gets a read-only memoryview
    """
    if size <= 0:
        raise ValueError(f"a shared buffer needs a positive size, not {size}")
    fd = _memfd("ikos-shared-buffer")
    try:
        os.ftruncate(fd, size)
        # fixed size, so a receiver can map it safely; not sealed against writes:
        # the sender keeps a writable mapping (the kernel refuses F_SEAL_WRITE then)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS_SIZED)
        return SharedBuffer(fd, size, writable=True)
    except BaseException:
        os.close(fd)
        raise


def map_segment(fd: int, size: int) -> memoryview:
    """Check ``fd`` (see :func:`check_segment`) and map it read-only; the fd is consumed.

    Returns a read-only ``memoryview`` whose ``obj`` is the :class:`SharedBuffer`
    holding the mapping and the descriptor: the view keeps both alive, and
    :func:`segment_of` finds the descriptor to forward it without a copy. On
    error the descriptor is closed too.
    """
    try:
        check_segment(fd, size)
        buf = SharedBuffer(fd, size, writable=False)
    except BaseException:
        os.close(fd)
        raise
    return memoryview(buf)


def segment_of(value: Any) -> SharedBuffer | None:
    """The :class:`SharedBuffer` that ``value`` spans whole, if any (else None).

    True for a :class:`SharedBuffer` and for a full ``memoryview`` of one (such
    as a received payload): those can be passed on by descriptor.
    """
    obj = value
    if isinstance(obj, memoryview):
        obj = obj.obj  # the exporter, also for a view of a view
        if not isinstance(obj, SharedBuffer) or obj.closed or value.nbytes != len(obj):
            return None
    if isinstance(obj, SharedBuffer) and obj.fd >= 0 and not obj.closed:
        return obj
    return None


def recv_with_fds(
    sock: socket.socket, buffer: bytearray | memoryview, ancbufsize: int = ANCILLARY_SIZE
) -> tuple[int, list[int]]:
    """``recvmsg_into`` that also returns the descriptors received (CLOEXEC).

    Hot paths inline the ``recvmsg_into`` call and use :func:`fds_of` only when
    ancillary data came: a function call per read costs about 0.1 µs.
    """
    n, anc, flags, _ = sock.recvmsg_into((buffer,), ancbufsize, RECV_FLAGS)
    if anc or flags & MSG_CTRUNC:
        return n, fds_of(anc, flags)
    return n, []


def fds_of(anc: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """The descriptors in what ``recvmsg`` returned as ancillary data.

    Descriptors cut off by a too small ancillary buffer (MSG_CTRUNC) are
    closed by the kernel; this raises ValueError then, after closing the ones
    that did arrive, since a frame lost its descriptor.
    """
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if flags & MSG_CTRUNC:
        close_all(fds)
        raise ValueError("descriptors were truncated in transit (too many in one message)")
    return fds.tolist()


def close_all(fds: Iterable[int]) -> None:
    """Close every descriptor in ``fds``, ignoring errors (a deque is emptied)."""
    if isinstance(fds, deque):
        while fds:
            _close_quietly(fds.popleft())
        return
    for fd in fds:
        _close_quietly(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> int:
    """One ``sendmsg`` of ``data`` with ``fds`` attached to its first byte; bytes sent."""
    return sock.sendmsg((data,), [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
