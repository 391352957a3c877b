"""Large payloads through shared memory: real ikosd, real actors, real memfds.

A bytes-like message or reply of at least the shared-memory threshold travels
as a sealed memfd passed with its frame; the receiver gets a read-only
``memoryview`` of the mapping. These tests check what the issue asks of it
(a 64 MiB round trip, ``/dev/shm`` untouched, also when the receiver is
killed mid-way, descriptors flat in the sender and in ikosd), the zero-copy
:class:`SharedBuffer`, and that a peer passing the wrong descriptors (none, a
pipe, an unsealed memfd, a wrong size) only loses its own connection.
The platform functions are tested on their own first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import HANG, IKOSCTL, Instance, read_line, wait_for

import ikos
from ikos._codec import encode, encode_out_of_band
from ikos.actors import _context, _runtime
from ikos.actors._ref import ASK, REPLY_OK, by_shm, encode_shm
from ikos.actors._stats import MEMFD_NAME
from ikos.platform import _memfd
from ikos.platform._memfd import (
    check_segment,
    close_all,
    create_segment,
    map_segment,
    recv_with_fds,
    segment_of,
    send_with_fds,
    shared_buffer,
)
from ikos.platform._paths import InstancePaths
from ikos.platform._unix import connect_unix
from ikos.platform._wire import HEADER, client_handshake, ensure_secret, read_secret

MIB = 1 << 20

# -- the platform layer ---------------------------------------------------------


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_create_segment_is_sealed_and_maps_read_only_without_a_copy():
    data = os.urandom(3 * MIB + 5)
    fd = create_segment(data)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals == _memfd.SEALS_FROZEN
    with pytest.raises(PermissionError):
        os.write(fd, b"x")
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 1)
    before = fd_count()
    view = map_segment(fd, len(data))
    assert isinstance(view, memoryview) and view.readonly
    assert view == data
    with pytest.raises(TypeError):
        view[0] = 1
    # the view spans its whole segment: it can be forwarded by descriptor
    segment = segment_of(view)
    assert segment is not None and os.fstat(segment.fd).st_size == len(data)
    assert segment_of(view[1:]) is None
    del view, segment
    assert fd_count() <= before - 1  # the fd given to map_segment, and mmap's copy, gone


@pytest.mark.parametrize("kind", ["pipe", "unsealed", "wrong size", "regular file", "empty"])
def test_check_segment_refuses_what_is_not_a_sealed_memfd_of_the_size(kind, tmp_path):
    if kind == "pipe":
        fd, w = os.pipe()
        os.close(w)
        size, why = 10, "not a regular file"
    elif kind == "unsealed":
        fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 10)
        size, why = 10, "not sealed against shrinking"
    elif kind == "wrong size":
        fd = create_segment(b"x" * 10)
        size, why = 11, "holds 10 bytes, the frame announced 11"
    elif kind == "regular file":
        (tmp_path / "f").write_bytes(b"x" * 10)
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        size, why = 10, "not a memfd"
    else:
        fd = create_segment(b"x")
        size, why = 0, "positive size"
    before = fd_count()
    with pytest.raises(ValueError, match=why):
        check_segment(fd, size)
    assert fd_count() == before  # check_segment leaves the fd to its caller
    with pytest.raises(ValueError, match=why):
        map_segment(fd, size)
    assert fd_count() == before - 1  # map_segment consumed it, error or not


def test_shared_buffer_is_written_in_place_and_sent_by_its_own_descriptor():
    buf = shared_buffer(MIB)
    buf[:5] = b"hello"
    memoryview(buf)[-3:] = b"end"
    body, fd, owned = encode_shm(ASK, 1, buf)
    assert fd == buf.fd and not owned  # no new segment: nothing was copied
    assert HEADER.size + len(body) < 200
    seals = fcntl.fcntl(buf.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    # a received view of it is forwarded the same way
    view = map_segment(os.dup(buf.fd), MIB)
    _, fd2, owned2 = encode_shm(REPLY_OK, 1, view)
    assert not owned2 and os.path.samestat(os.fstat(fd2), os.fstat(buf.fd))
    assert bytes(view[:5]) == b"hello" and bytes(view[-3:]) == b"end"
    with pytest.raises(ValueError):
        shared_buffer(0)


def test_descriptors_cross_a_socket_and_too_many_are_all_closed():
    a, b = socket.socketpair()
    with a, b:
        fd = create_segment(b"abc")
        send_with_fds(a, b"frame", [fd])
        os.close(fd)
        buf = bytearray(100)
        n, fds = recv_with_fds(b, buf)
        assert bytes(buf[:n]) == b"frame" and len(fds) == 1
        assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert bytes(map_segment(fds[0], 3)) == b"abc"
        many = [create_segment(b"x") for _ in range(_memfd.MAX_PENDING_FDS + 2)]
        send_with_fds(a, b"more", many)
        close_all(many)
        before = fd_count()
        with pytest.raises(ValueError, match="truncated"):
            recv_with_fds(b, buf)
        assert fd_count() == before  # those that arrived were closed too


# -- the mailbox path, end to end -------------------------------------------------

ACTORS = """
import hashlib
import os
import time

import ikos


class Digest(ikos.Actor):
    def receive(self, message):
        if message == "pid":
            return os.getpid()
        return (type(message).__name__, getattr(message, "readonly", None), len(message),
                hashlib.sha256(message).hexdigest())


class Echo(ikos.Actor):
    def receive(self, message):
        return message


class Gated(ikos.Actor):
    \"\"\"Takes its time on each payload until the gate file exists; counts the payloads
    it handled and the most memfd descriptors it ever held.\"\"\"

    def __init__(self, gate):
        self.gate = gate
        self.handled = self.peak = 0

    def receive(self, message):
        if message == "pid":
            return os.getpid()
        if message in ("peak", "handled"):
            return getattr(self, message)
        held = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                held += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:ikos-")
            except OSError:
                pass
        self.peak = max(self.peak, held)
        self.handled += 1
        deadline = time.monotonic() + 120
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(message)
"""


def start(ikosd_factory, tmp_path: Path) -> Instance:
    tree = f"""{ACTORS}
GATE = {str(tmp_path / "gate")!r}
tree = ikos.Supervisor("root", children=[
    ikos.Child("digest", Digest), ikos.Child("echo", Echo),
    ikos.Child("gated", Gated, args=(GATE,)),
])
"""
    return ikosd_factory(tree=textwrap.dedent(tree))


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


STATS_MEMFD = f"/memfd:{MEMFD_NAME}"


def memfds_of(pid: int | str) -> list[str]:
    """The payload segments ``pid`` holds open (its memfd descriptors), leaving out an
    actor's counters page (``ikos.actors._stats``), which lives as long as the actor."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:ikos-") and not target.startswith(STATS_MEMFD):
            found.append(target)
    return found


def no_new_dev_shm(before: set[str]) -> bool:
    # other programs on the machine may come and go in /dev/shm: what must hold is
    # that nothing of ours stays, so wait for the listing to settle
    return wait_for(lambda: not dev_shm() - before, 10, message="/dev/shm as it was")


def test_64_mib_round_trip_arrives_as_a_read_only_view_and_leaves_nothing(ikosd_factory, tmp_path):
    inst = start(ikosd_factory, tmp_path)
    shm_before = dev_shm()
    digest, echo = (ikos.ActorRef(n, root=inst.root) for n in ("digest", "echo"))
    assert digest.ask("pid", timeout=10) and echo.ask(b"small", timeout=10) == b"small"
    mine, ikosd = fd_count(), fd_count(inst.pid)
    data = os.urandom(64 * MIB)  # over the 64 MiB frame limit with the envelope
    for _ in range(3):
        kind, readonly, size, hexdigest = digest.ask(data, timeout=60)
        assert (kind, readonly, size) == ("memoryview", True, len(data))
        assert hexdigest == hashlib.sha256(data).hexdigest()
        back = echo.ask(data, timeout=60)  # the reply goes by shm too
        assert type(back) is memoryview and back.readonly and back == data
        del back
    assert fd_count() == mine and not memfds_of("self")
    assert fd_count(inst.pid) == ikosd and not memfds_of(inst.pid)
    assert not memfds_of(digest.ask("pid", timeout=10))
    no_new_dev_shm(shm_before)
    # below the threshold nothing changes: bytes in, bytes out
    assert echo.ask(b"x" * 1000, timeout=10) == b"x" * 1000


def test_shared_buffer_goes_both_ways_without_a_copy(ikosd_factory, tmp_path):
    inst = start(ikosd_factory, tmp_path)
    echo = ikos.ActorRef("echo", root=inst.root)
    digest = ikos.ActorRef("digest", root=inst.root)
    buf = shared_buffer(64 * MIB)
    buf[: 8 * MIB] = os.urandom(8 * MIB)
    buf[-5:] = b"tail!"
    expected = hashlib.sha256(buf).hexdigest()
    assert digest.ask(buf, timeout=60) == ("memoryview", True, len(buf), expected)
    back = echo.ask(buf, timeout=60)
    # the actor forwarded the very segment it received, which is the sender's own
    segment = segment_of(back)
    assert segment is not None and segment.fd != buf.fd
    assert os.path.samestat(os.fstat(segment.fd), os.fstat(buf.fd))
    buf[0:1] = b"!"  # same memory, not a copy
    assert back[0:1] == b"!"
    # a small SharedBuffer goes by descriptor too
    small = shared_buffer(10)
    small[:] = b"0123456789"
    assert digest.ask(small, timeout=10)[:3] == ("memoryview", True, 10)


def test_receiver_killed_with_payloads_queued_leaves_no_segment(ikosd_factory, tmp_path):
    inst = start(ikosd_factory, tmp_path)
    shm_before = dev_shm()
    gated = ikos.ActorRef("gated", root=inst.root)
    pid = gated.ask("pid", timeout=10)
    mine, ikosd = fd_count(), fd_count(inst.pid)
    data = os.urandom(32 * MIB)
    for _ in range(3):  # one in receive, the others waiting in its socket
        gated.tell(data, timeout=30)
    assert wait_for(lambda: memfds_of(pid), 30, message="the first payload mapped")
    assert not memfds_of("self")  # the sender's copies went with the sends
    os.kill(pid, signal.SIGKILL)
    new = inst.wait_running_new_pid("gated", pid)
    assert not memfds_of(new) and not memfds_of(inst.pid)
    assert fd_count() == mine and fd_count(inst.pid) == ikosd
    no_new_dev_shm(shm_before)
    (tmp_path / "gate").touch()
    assert gated.ask(data, timeout=60) == len(data)


# -- garbage ------------------------------------------------------------------------


def raw_client(inst: Instance, name: str) -> socket.socket:
    """An authenticated mailbox connection on which the test writes frames by hand."""
    paths = InstancePaths.resolve(inst.root)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connect_unix(sock, paths.actor_socket(name))
    client_handshake(sock, read_secret(paths.secret_file), 10)
    sock.settimeout(HANG)
    return sock


def unsealed_memfd(size: int) -> int:
    fd = os.memfd_create("ikos-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def garbage(kind: str) -> tuple[bytes, list[int]]:
    """A frame (with its length) and the descriptors to attach to it."""
    size = 4096
    body, _ = encode_out_of_band((ASK, 1, pickle.PickleBuffer(b"x" * size)))
    if kind == "no descriptor":
        fds = []
    elif kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        fds = [r]
    elif kind == "unsealed memfd":
        fds = [unsealed_memfd(size)]
    elif kind == "wrong size":
        fds = [create_segment(b"x" * (size - 1))]
    elif kind == "descriptor without shm":
        body, fds = encode((ASK, 1, "pid")), [create_segment(b"x")]
    elif kind == "too many descriptors":
        fds = [create_segment(b"x" * size) for _ in range(20)]
    else:
        raise AssertionError(kind)
    return HEADER.pack(len(body)) + body, fds


@pytest.mark.parametrize(
    "kind",
    [
        "no descriptor",
        "pipe",
        "unsealed memfd",
        "wrong size",
        "descriptor without shm",
        "too many descriptors",
    ],
)
def test_wrong_descriptors_close_only_that_connection(ikosd_factory, tmp_path, kind):
    inst = start(ikosd_factory, tmp_path)
    digest = ikos.ActorRef("digest", root=inst.root)
    pid = digest.ask("pid", timeout=10)
    actor_fds = fd_count(pid)
    mine = fd_count()
    sock = raw_client(inst, "digest")
    frame, fds = garbage(kind)
    try:
        if fds:
            send_with_fds(sock, frame, fds)
        else:
            sock.sendall(frame)
    finally:
        close_all(fds)
    # the ask is never answered: the actor closes the connection instead
    assert sock.recv(65536) == b""
    sock.close()
    assert fd_count() == mine
    # the actor lives on, holding nothing of what it was sent
    assert digest.ask("pid", timeout=10) == pid == inst.pid_of("digest")
    assert wait_for(lambda: fd_count(pid) == actor_fds, 10, message="the actor's fds flat")
    assert not memfds_of(pid)
    good = os.urandom(2 * MIB)
    assert digest.ask(good, timeout=30)[3] == hashlib.sha256(good).hexdigest()


SENDER = """
import sys

import ikos

ref = ikos.ActorRef("gated", root=sys.argv[1])
data = b"s" * (16 << 20)
for _ in range(2):
    ref.tell(data, timeout=30)
print("sent", flush=True)
sys.stdin.readline()  # killed here
"""


def test_sender_killed_after_sending_leaves_no_segment(ikosd_factory, tmp_path):
    inst = start(ikosd_factory, tmp_path)
    shm_before = dev_shm()
    gated = ikos.ActorRef("gated", root=inst.root)
    pid = gated.ask("pid", timeout=10)
    with subprocess.Popen(
        [sys.executable, "-c", SENDER, str(inst.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as sender:
        try:
            assert sender.stdout is not None and read_line(sender.stdout) == "sent\n"
            assert wait_for(lambda: memfds_of(pid), 30, message="the first payload mapped")
        finally:
            sender.kill()
            sender.wait()
    # the messages outlive their sender, and are released once handled
    (tmp_path / "gate").touch()
    assert wait_for(lambda: not memfds_of(pid), 30, message="both payloads consumed")
    assert gated.ask("pid", timeout=10) == pid
    no_new_dev_shm(shm_before)


def test_stopping_actor_answers_queued_payloads_and_stops_normally(ikosd_factory, tmp_path):
    inst = start(ikosd_factory, tmp_path)
    gated = ikos.ActorRef("gated", root=inst.root)
    pid = gated.ask("pid", timeout=10)
    data = b"q" * (4 * MIB)
    for _ in range(3):  # one in receive, two for the drain at stop to read and map
        gated.tell(data, timeout=30)
    assert wait_for(lambda: memfds_of(pid), 30, message="the first payload mapped")
    stop = subprocess.Popen([IKOSCTL, "--root", str(inst.root), "stop", "gated"])
    try:
        assert wait_for(lambda: inst.state("gated") == "stopping", 30)
        (tmp_path / "gate").touch()
        assert stop.wait(timeout=HANG) == 0
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait()
    assert wait_for(lambda: "actor gated: stopping -> stopped" in inst.log_text(), 30)
    line = next(x for x in inst.log_text().splitlines() if "gated: stopping -> stopped" in x)
    assert "normal" in line, line
    assert not memfds_of(inst.pid)


def test_the_threshold_is_read_from_instance_json(tmp_path):
    paths = InstancePaths.for_root(tmp_path)
    paths.create()
    ensure_secret(paths.secret_file)
    paths.instance_file.write_text(json.dumps({"max_message_bytes": 1000, "shm_threshold": 77}))
    ctx = _context.get(tmp_path)
    assert (ctx.max_frame, ctx.shm_threshold) == (1000, 77)
    other = tmp_path / "other"
    paths = InstancePaths.for_root(other)
    paths.create()
    ensure_secret(paths.secret_file)
    paths.instance_file.write_text(json.dumps({"shm_threshold": "big"}))
    assert _context.get(other).shm_threshold == _memfd.DEFAULT_SHM_THRESHOLD
    assert by_shm(b"x" * 77, 77) and not by_shm(b"x" * 76, 77)
    assert by_shm(shared_buffer(1), 77)  # a SharedBuffer goes by descriptor at any size
    assert not by_shm(memoryview(b"x" * 100)[::2], 1)  # not contiguous: not shm


def test_mapped_messages_waiting_in_the_mailbox_are_bounded(ikosd_factory, tmp_path):
    """Many clients' payloads arriving at once are mapped at most MAX_QUEUED_SEGMENTS
    at a time: the actor stops reading, as for a full mailbox, and loses nothing."""
    inst = start(ikosd_factory, tmp_path)
    gated = ikos.ActorRef("gated", root=inst.root)
    pid = gated.ask("pid", timeout=10)
    buf = shared_buffer(100)
    clients = _runtime.MAX_QUEUED_SEGMENTS + 16
    barriers = connected, go, sent, end = [threading.Barrier(clients + 1) for _ in range(4)]
    one_at_a_time = threading.Lock()  # more handshakes at once than the actor keeps
    errors: list[BaseException] = []

    def client() -> None:
        try:
            ref = ikos.ActorRef("gated", root=inst.root)
            with one_at_a_time:
                ref.ask("pid", timeout=30)  # connected before the actor blocks
            connected.wait(HANG)
            go.wait(HANG)
            ref.tell(buf, timeout=30)
            sent.wait(HANG)
            end.wait(HANG)
        except BaseException as exc:
            errors.append(exc)
            for barrier in barriers:
                barrier.abort()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        connected.wait(HANG)
        gated.tell(b"blocks until the gate opens", timeout=10)
        go.wait(HANG)
        sent.wait(HANG)  # every payload is in the actor's sockets, none read yet
        (tmp_path / "gate").touch()
        # none lost (other connections' messages are not ordered with this one's: poll)
        assert wait_for(lambda: gated.ask("handled", timeout=60) == clients + 1, 60)
        assert gated.ask("peak", timeout=60) <= 2 * (_runtime.MAX_QUEUED_SEGMENTS + 1) + 1
    finally:
        if not errors:
            end.wait(HANG)
        for t in threads:
            t.join(HANG)
    assert not errors, errors
    assert gated.ask("pid", timeout=10) == pid
