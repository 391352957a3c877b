"""The descriptor keeper, in C and in Python: its protocol, hostile peers, ikosd's recovery.

Every test runs against both keepers (``IKOS_FDKEEPER=python`` forces the
Python fallback): they must speak the same bytes, so that ikosd works with
either, and with one started by an earlier ikosd of the other kind. The
keepers are driven through ikosd's own side (:class:`FdStore`) and through
raw sockets for what ikosd never sends: garbage, truncated messages, a flood
of descriptors. After each, the keeper must still run, hold exactly what it
held (no descriptor leaked or lost), and hand it all back.
"""

from __future__ import annotations

import array
import os
import pickle
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import alive, wait_for

from ikos.platform import _cgexec
from ikos.platform._fdstore import FdStore, build_keeper, keeper_kind

KINDS = ["c", "python"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The keeper under test; for C, built first (skipped where there is no compiler)."""
    if request.param == "c":
        if _cgexec.compiler() is None:
            pytest.skip("no C compiler to build the descriptor keeper")
        monkeypatch.delenv("IKOS_FDKEEPER", raising=False)
        assert build_keeper() is not None
    else:
        monkeypatch.setenv("IKOS_FDKEEPER", "python")
    return str(request.param)


@pytest.fixture
def store(kind: str, tmp_path: Path) -> Iterator[FdStore]:
    """An FdStore with a fresh keeper of ``kind``; the keeper is told to quit afterwards."""
    fs = FdStore(tmp_path / "fdstore.sock")
    assert fs.open() == {}
    assert fs.kind == kind
    assert fs.process is not None
    pid = fs.process.pid
    yield fs
    if fs.sock is None and alive(pid):  # a test closed it: reconnect to say quit
        fs.open()
    fs.quit()
    assert not alive(pid)


def reopen(fs: FdStore) -> dict[str, dict[str, int]]:
    """What a new ikosd takes back: close ikosd's connection, connect again, list."""
    fs.close()
    return fs.open()


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def close_held(held: dict[str, dict[str, int]]) -> None:
    for keys in held.values():
        for fd in keys.values():
            os.close(fd)


def raw(fs: FdStore) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(30)
    sock.connect(str(fs.path))
    return sock


def test_descriptors_come_back_replaced_dropped_and_in_order(store: FdStore) -> None:
    pipes = [os.pipe() for _ in range(4)]
    try:
        store.put("web", "stdout", pipes[0][0])
        store.put("web", "stderr", pipes[1][0])
        store.put("é" * 300, "listener", pipes[2][0])  # a long, non-ASCII name
        store.put("db", "status", pipes[3][0])
        store.put("db", "stats", pipes[3][1])
        store.put("web", "stdout", pipes[2][1])  # replaces, and moves last
        store.drop("db", ["stats", "nothing"])
        name = "x" * 3
        store.put(name, name, pipes[0][1])
        store.put(name, "other", pipes[1][1])
        # the same string object twice: pickle writes a memo reference (BINGET)
        store.drop(name, [name])
        held = reopen(store)
        try:
            assert held == {
                "web": {"stderr": held["web"]["stderr"], "stdout": held["web"]["stdout"]},
                "é" * 300: {"listener": held["é" * 300]["listener"]},
                "db": {"status": held["db"]["status"]},
                "xxx": {"other": held["xxx"]["other"]},
            }
            assert same_file(held["web"]["stdout"], pipes[2][1])
            assert same_file(held["web"]["stderr"], pipes[1][0])
            assert same_file(held["db"]["status"], pipes[3][0])
            # the descriptor is the pipe itself, not a copy of its contents
            os.write(pipes[2][1], b"through the keeper")
            assert os.read(held["é" * 300]["listener"], 100) == b"through the keeper"
        finally:
            close_held(held)
        store.drop("web")  # keys=None: all of them
        held = reopen(store)
        close_held(held)
        assert sorted(held) == ["db", "xxx", "é" * 300]
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_replies_are_the_bytes_pickle_writes(store: FdStore) -> None:
    r, w = os.pipe()
    try:
        store.put("n" * 260, "stdout", r)
        store.close()
        with raw(store) as sock:
            sock.send(pickle.dumps({"op": "list"}))
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4))
            assert data == pickle.dumps({"op": "entry", "name": "n" * 260, "key": "stdout"})
            fd = array.array("i", anc[0][2]).tolist()[0]
            assert same_file(fd, r)
            os.close(fd)
            assert sock.recv(65536) == pickle.dumps({"op": "end"})
    finally:
        os.close(r)
        os.close(w)


def test_quit_closes_everything_and_removes_the_socket(store: FdStore) -> None:
    r, w = os.pipe()
    store.put("web", "stdout", w)
    os.close(w)
    assert store.process is not None
    pid = store.process.pid
    store.quit()
    assert not alive(pid) and store.process is None
    assert not store.path.exists()
    assert os.read(r, 10) == b""  # the keeper's copy of the write end is closed
    os.close(r)


def test_the_socket_is_for_its_owner_only(store: FdStore) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def flood(sock: socket.socket, n: int) -> None:
    """A put with ``n`` descriptors: more than the keeper takes (64) when n > 64."""
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
    try:
        msg = pickle.dumps({"op": "put", "name": "flood", "key": "k"})
        sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    finally:
        for fd in fds:
            os.close(fd)


PUT = pickle.dumps({"op": "put", "name": "web", "key": "stdout"})
GARBAGE: dict[str, Any] = {
    "random bytes": os.urandom(300),
    "an empty message": b"",
    "half a put, with its descriptor": PUT[: len(PUT) // 2],
    "a put without its STOP": PUT[:-1],
    "a put with bytes after its STOP": PUT + b"junk",
    "a put with two descriptors": (PUT, 2),
    "a put with 200 descriptors": (PUT, 200),
    "a message too long": b"\x80\x04" + b"N" * 70000,
    "a pickle of a list": pickle.dumps(["op", "put"]),
    "a dict of other things": pickle.dumps({"op": 1, "name": b"web", "key": 2.5}),
    "a drop without a name": pickle.dumps({"op": "drop", "keys": None}),
    "a drop with a number for keys": pickle.dumps({"op": "drop", "name": "web", "keys": 5}),
    "a nested dict": pickle.dumps({"op": "other", "name": {"a": "b"}}),
    "a string that is not UTF-8": b"\x80\x04\x8c\x01\xff.",
    "a put named in bad UTF-8": PUT.replace(b"\x8c\x03web", b"\x8c\x03w\xffb"),
    "a global (code to run)": b"cos\nsystem\n(S'touch PWNED'\ntR.",
    "a memo reference to nothing": b"\x80\x04}\x94h\x09.",
    "a huge frame length": b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xff}.",
    "a huge string length": b"\x80\x04X\xff\xff\xff\x7f",
    "deep nesting": b"\x80\x04" + b"]" * 5000 + b".",
    "marks only": b"(" * 5000 + b"u.",
}


@pytest.mark.parametrize("what", list(GARBAGE))
def test_garbage_leaves_the_keeper_whole(store: FdStore, what: str, tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        store.put("web", "stdout", w)
        assert store.process is not None
        pid = store.process.pid
        close_held(reopen(store))  # a round trip: the keeper serves this connection now
        before = open_fds(pid)  # stdio, the listener, ikosd's connection, the held pipe
        store.close()  # so that the keeper serves the raw connection next
        payload = GARBAGE[what]
        pwned = tmp_path / "pwned"  # what the global would create, were it run
        if isinstance(payload, bytes):
            payload = payload.replace(b"PWNED", str(pwned).encode())
        with raw(store) as sock:
            if isinstance(payload, tuple):
                flood(sock, payload[1])
            else:
                fds = [os.open("/dev/null", os.O_RDONLY)]
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                try:
                    sock.sendmsg([payload], anc)
                except OSError:
                    pass  # too long for the socket: the keeper never saw it
                os.close(fds[0])
        # the peer is gone mid-conversation: the keeper is serving the next one (sessions
        # come one at a time), holding what it held, and nothing of the garbage
        held = reopen(store)
        close_held(held)
        assert list(held) == ["web"] and list(held["web"]) == ["stdout"]
        assert alive(pid) and open_fds(pid) == before
        assert not pwned.exists()
    finally:
        os.close(r)
        os.close(w)


def test_a_peer_that_never_reads_its_list_does_not_keep_the_keeper(store: FdStore) -> None:
    """Sessions are served one at a time: a peer gone mid-list must end its own."""
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(300)]
    for i, fd in enumerate(fds):
        store.put("many", str(i), fd)
        os.close(fd)
    store.close()
    with raw(store) as sock:
        sock.send(pickle.dumps({"op": "list"}))
        sock.recvmsg(65536, socket.CMSG_SPACE(4))  # one entry read, then hang up
    held = store.open()
    close_held(held)
    assert len(held["many"]) == 300


def test_a_keeper_of_the_other_kind_is_reused(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ikosd finds the keeper an earlier one started, whichever kind it is."""
    first = FdStore(tmp_path / "fdstore.sock")
    first.open()
    assert first.process is not None
    r, w = os.pipe()
    first.put("web", "stdout", w)
    first.close()
    monkeypatch.setenv("IKOS_FDKEEPER", "c" if kind == "python" else "python")
    second = FdStore(first.path)
    held = second.open()
    assert second.kind == kind == keeper_kind(first.process.pid)
    assert second.process is None  # found, not started
    assert same_file(held["web"]["stdout"], w)
    close_held(held)
    second.process = first.process  # to wait for it
    second.quit()
    os.close(r)
    os.close(w)


CONFIG = """
[ikosd]
metrics = false

[executables.talker]
executable = "/bin/sh"
args = ["-c", "echo before; until [ -e {gate} ]; do sleep 0.05; done; echo after; exec sleep 1000"]
"""


def test_ikosd_takes_its_log_pipes_back_after_kill_9_and_hostile_peers(
    kind: str, ikosd_factory: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    config = CONFIG.format(gate=gate)
    env = {"IKOS_FDKEEPER": os.environ.get("IKOS_FDKEEPER", "c")}
    inst = ikosd_factory(config=config, name="same", env=env)
    log = inst.root / "var" / "log" / "ikos" / "talker.log"
    wait_for(lambda: "before" in log.read_text(), message="the talker's first line")
    assert f"descriptor keeper ({kind}) started" in inst.log_text()
    pid = inst.pid_of("talker")
    inst.crash()
    # while no ikosd runs, a peer sends garbage and a flood of descriptors, then quits
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(inst.root / "run" / "ikos" / "fdstore.sock"))
        sock.send(b"\x80\x04garbage")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(inst.root / "run" / "ikos" / "fdstore.sock"))
        flood(sock, 100)
    again = ikosd_factory(config=config, name="same", env=env)
    assert again.pid_of("talker") == pid  # adopted
    text = again.log_text()
    assert f"descriptor keeper ({kind}) found" in text, text[-2000:]
    gate.touch()
    # the daemon's stdout is the pipe the keeper kept: the line reaches the new ikosd
    wait_for(lambda: "after" in log.read_text(), message="the talker's line after the crash")


PEER = """
import pickle, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.settimeout(30)
sock.connect(sys.argv[1])
try:
    sock.send(pickle.dumps({"op": "list"}))
    data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * 64))
except (BrokenPipeError, ConnectionResetError):  # hung up on, before or after our message
    data, anc = b"", []
print(repr(data), len(anc))
"""


# the peer runs as nobody, who may not run the venv's interpreter (under /root)
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root and /usr/bin/python3 to run a peer as another user",
)
def test_a_peer_of_another_uid_is_hung_up_on(kind: str, tmp_path: Path) -> None:
    """Even where the socket's mode lets it connect (0666 here, on purpose), the keeper
    gives a peer of another uid nothing: it checks the peer's credentials first."""
    import subprocess
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ikos-fdkeeper-uid-"))
    fs = FdStore(base / "fdstore.sock")
    r, w = os.pipe()
    try:
        base.chmod(0o755)  # nobody may reach the socket, and does
        fs.open()
        fs.put("web", "stdout", w)
        fs.close()
        fs.path.chmod(0o666)
        out = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-S", "-c", PEER, str(fs.path)],
            user=65534,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "b'' 0"  # end of file, no descriptor
        held = fs.open()  # ikosd's uid: everything is there
        assert same_file(held["web"]["stdout"], w)
        close_held(held)
    finally:
        if fs.sock is None and fs.process is not None:
            fs.open()
        fs.quit()
        os.close(r)
        os.close(w)
        for leftover in base.iterdir():
            leftover.unlink()
        base.rmdir()
