"""The message path end to end: real ikosd, real actor processes, real sockets.

Every test starts ikosd on a small tree (``ikosd_factory``) and talks to its
actors with :class:`ikos.ActorRef` from the test process, from sender
subprocesses, or from other actors. Where a test needs an actor to be busy
at a known moment, the actor waits for a *gate* file the test creates: the
test then knows exactly which messages are queued, instead of guessing
with sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import HANG, IKOSCTL, Instance, read_line, wait_for

import ikos
from ikos._codec import decode, encode
from ikos.actors import _ref, _runtime
from ikos.actors._ref import ASK, REPLY_ERR, REPLY_OK, TELL
from ikos.platform._paths import InstancePaths
from ikos.platform._unix import connect_unix
from ikos.platform._wire import (
    HEADER,
    MAGIC,
    NONCE,
    SERVER_LEN,
    _mac,
    client_handshake,
    read_secret,
)

ACTORS = """
import os
import time

import ikos


def wait_gate(path):
    deadline = time.monotonic() + 120  # the test's own waits fail long before
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate {path} never opened")
        time.sleep(0.005)


class Recorder(ikos.Actor):
    \"\"\"Records every (sender, seq) it is told; answers 'sync' and 'dump'.\"\"\"

    def on_start(self):
        self.seen = []

    def receive(self, message):
        if message == "sync":
            return len(self.seen)
        if message == "dump":
            return self.seen
        if isinstance(message, tuple) and message[0] == "hello":
            return "hi"
        self.seen.append(message)


class Gated(ikos.Actor):
    \"\"\"Handles nothing until its gate file exists; counts what it handled.\"\"\"

    def __init__(self, gate):
        self.gate = gate
        self.handled = []

    def receive(self, message):
        open(self.gate + ".busy", "w").close()
        wait_gate(self.gate)
        if isinstance(message, tuple) and message[0] == "sleep":
            time.sleep(message[1])
        if message == "count":
            return len(self.handled)
        if message == "pid":
            return os.getpid()
        self.handled.append(message if isinstance(message, str) else len(message))


class Sleeper(ikos.Actor):
    def receive(self, message):
        if isinstance(message, tuple) and message[0] == "sleep":
            time.sleep(message[1])
            return ("slept", message[1])
        return ("echo", message)


def explode(value):
    raise ValueError(f"kaboom {value}")


class Fragile(ikos.Actor):
    def receive(self, message):
        if message == "boom":
            explode(42)
        if message == "unpicklable":
            return (x for x in ())  # neither pickle nor dill can encode a generator
        return os.getpid()


class Front(ikos.Actor):
    def receive(self, message):
        return ("front", self.actor("back").ask(message, timeout=10))


class Back(ikos.Actor):
    def receive(self, message):
        return ("back", message, os.getpid())


def make_adder(k):
    def add(x):
        return x + k

    return add


class Apply(ikos.Actor):
    \"\"\"Calls what it is sent and sends functions back (dill both ways).\"\"\"

    def receive(self, message):
        kind, payload = message
        if kind == "call":
            fn, arg = payload
            return fn(arg), fn
        if kind == "object":
            return payload.describe(), payload, type(payload)
        if kind == "make":
            return (lambda x: x * payload), make_adder(payload)
        raise ValueError(kind)
"""


def tree_source(children: str, **constants: object) -> str:
    """A tree file: the actors above, ``constants`` as globals, then ``tree``."""
    consts = "".join(f"{k} = {v!r}\n" for k, v in constants.items())
    body = textwrap.dedent(children).strip()
    return f"{ACTORS}\n{consts}\ntree = {body}\n"


def ref(inst: Instance, name: str) -> ikos.ActorRef:
    return ikos.ActorRef(name, root=inst.root)


# -- order ---------------------------------------------------------------------

SENDER = """
import sys

import ikos

root, name, sender, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ref = ikos.ActorRef(name, root=root)
assert ref.ask(("hello", sender), timeout=30) == "hi"  # connected and authenticated
print("ready", flush=True)
sys.stdin.readline()  # every sender starts at once
for seq in range(count):
    ref.tell((sender, seq), timeout=60)
# same connection, so FIFO: the answer comes after all of this sender's tells
print("done", ref.ask("sync", timeout=60), flush=True)
"""


@pytest.mark.parametrize("mailbox_size", [1000, 3])
def test_per_sender_fifo_under_concurrent_senders(ikosd_factory, mailbox_size):
    senders, count = 4, 2000
    inst = ikosd_factory(
        tree=tree_source(
            f'ikos.Supervisor("root", children=[ikos.Child("rec", Recorder, '
            f"mailbox_size={mailbox_size})])"
        )
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SENDER, str(inst.root), "rec", f"s{i}", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(senders)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and read_line(p.stdout) == "ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
            assert out.startswith("done ")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    seen = ref(inst, "rec").ask("dump", timeout=30)
    assert len(seen) == senders * count
    by_sender: dict[str, list[int]] = {}
    for sender, seq in seen:
        by_sender.setdefault(sender, []).append(seq)
    assert sorted(by_sender) == [f"s{i}" for i in range(senders)]
    for sender, seqs in by_sender.items():
        assert seqs == list(range(count)), f"{sender} out of order or incomplete"


# -- backpressure --------------------------------------------------------------


def test_bounded_mailbox_blocks_then_raises_mailbox_full(ikosd_factory, tmp_path):
    gate = tmp_path / "gate"
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("slow", Gated, args=(GATE,), '
            "mailbox_size=2)])",
            GATE=str(gate),
        )
    )
    slow = ref(inst, "slow")
    pid = inst.pid_of("slow")
    payload = b"x" * 65536
    accepted = 0
    for _ in range(500):  # the kernel buffers hold a few; the bound must bite long before
        t0 = time.monotonic()
        try:
            slow.tell(payload, timeout=0.5)
        except ikos.MailboxFull as exc:
            elapsed = time.monotonic() - t0
            assert exc.name == "slow"
            break
        accepted += 1
    else:
        pytest.fail("500 tells of 64 KiB to a blocked actor with mailbox_size=2 never blocked")
    # not before the tell's timeout; the upper bound is on hangs, not a performance claim
    assert 0.45 <= elapsed < HANG, f"MailboxFull after {elapsed:.2f}s, wanted about 0.5s"
    assert accepted >= 2
    # Open the gate: the actor handles every tell that was accepted, then more.
    gate.touch()
    assert wait_for(lambda: slow.ask("count", timeout=10) == accepted, 30)
    slow.tell(payload, timeout=5)
    assert wait_for(lambda: slow.ask("count", timeout=10) == accepted + 1, 30)
    assert slow.ask("pid", timeout=10) == pid == inst.pid_of("slow")


# -- asks ----------------------------------------------------------------------


def test_ask_timeout_then_the_connection_serves_the_next_ask(ikosd_factory):
    inst = ikosd_factory(
        tree=tree_source('ikos.Supervisor("root", children=[ikos.Child("sleeper", Sleeper)])')
    )
    sleeper = ref(inst, "sleeper")
    assert sleeper.ask("warm", timeout=10) == ("echo", "warm")
    conn = _ref._pool.conns[(str(inst.root), "sleeper")]
    t0 = time.monotonic()
    with pytest.raises(ikos.AskTimeout) as info:
        sleeper.ask(("sleep", 1.5), timeout=0.5)
    elapsed = time.monotonic() - t0
    # Raised, so the late reply was not waited for (it would have been returned). The
    # lower bound: not before the timeout; the upper one is on hangs, not on speed.
    assert 0.45 <= elapsed < HANG, f"AskTimeout after {elapsed:.2f}s, wanted about 0.5s"
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, ikos.ActorError) and info.value.name == "sleeper"
    # A second timed-out ask queues a second late reply.
    with pytest.raises(TimeoutError):
        sleeper.ask(("sleep", 0.5), timeout=0.1)
    # The next ask skips both late replies and gets its own answer, on the same connection.
    assert sleeper.ask("next", timeout=10) == ("echo", "next")
    assert sleeper.ask("after", timeout=10) == ("echo", "after")
    assert _ref._pool.conns[(str(inst.root), "sleeper")] is conn


def test_ask_to_a_busy_actor_times_out_even_before_it_took_the_connection(ikosd_factory, tmp_path):
    gate = tmp_path / "gate"
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("slow", Gated, args=(GATE,))])',
            GATE=str(gate),
        )
    )
    busy = threading.Thread(target=lambda: ref(inst, "slow").tell("hold"))
    busy.start()
    busy.join(30)
    wait_for(lambda: Path(f"{gate}.busy").exists(), message="the actor to be busy")
    fresh = ref(inst, "slow")  # this thread has no connection yet
    t0 = time.monotonic()
    with pytest.raises(ikos.AskTimeout):
        fresh.ask("count", timeout=0.5)
    # The actor stays busy until the gate opens: returning at all shows the timeout
    # counted before the actor took the connection (a bound on hangs, not on speed).
    assert time.monotonic() - t0 < HANG
    # A tell meets the same busy actor as backpressure, never as a dead letter.
    before = _ref.dead_letter_count()
    t0 = time.monotonic()
    with pytest.raises(ikos.MailboxFull):
        fresh.tell("late", timeout=0.5)
    assert 0.45 <= time.monotonic() - t0 < HANG  # not before its timeout; then a bound on hangs
    assert _ref.dead_letter_count() == before
    gate.touch()
    assert wait_for(lambda: fresh.ask("count", timeout=10) == 1)


def test_ask_to_a_stopped_actor_raises_actor_dead_fast(ikosd_factory):
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("sleeper", Sleeper), '
            'ikos.Child("other", Sleeper)])'
        )
    )
    pooled = ref(inst, "sleeper")
    assert pooled.ask("hi", timeout=10) == ("echo", "hi")  # holds a connection
    inst.ctl("stop", "sleeper", check=True)
    assert inst.state("sleeper") == "stopped"
    for attempt in (pooled, ikos.ActorRef("sleeper", root=inst.root)):
        t0 = time.monotonic()
        with pytest.raises(ikos.ActorDeadError) as info:
            attempt.ask("hi", timeout=2 * HANG)
        # Fast means: not by waiting out (most of) the ask's timeout, which is twice
        # this bound on hangs. How fast a refusal is belongs in bench/.
        assert time.monotonic() - t0 < HANG
        assert info.value.name == "sleeper"
    assert ref(inst, "other").ask("still", timeout=10) == ("echo", "still")
    inst.ctl("start", "sleeper", check=True)
    assert pooled.ask("back", timeout=10) == ("echo", "back")


def test_receive_exception_reaches_the_asker_as_actor_crashed(ikosd_factory):
    inst = ikosd_factory(
        tree=tree_source('ikos.Supervisor("root", children=[ikos.Child("fragile", Fragile)])')
    )
    fragile = ref(inst, "fragile")
    pid = fragile.ask("pid", timeout=10)
    with pytest.raises(ikos.ActorCrashed) as info:
        fragile.ask("boom", timeout=10)
    err = info.value
    assert err.name == "fragile"
    assert err.exc_type == "ValueError"
    assert "ValueError: kaboom 42" in err.traceback
    assert "in explode" in err.traceback and "in receive" in err.traceback
    assert "kaboom 42" in str(err)
    # The actor crashed; its supervisor restarted it, and the same ref reaches the new one.
    new = inst.wait_running_new_pid("fragile", pid)
    assert fragile.ask("pid", timeout=10) == new


def test_unpicklable_reply_is_a_clear_error_and_the_actor_survives(ikosd_factory):
    inst = ikosd_factory(
        tree=tree_source('ikos.Supervisor("root", children=[ikos.Child("fragile", Fragile)])')
    )
    fragile = ref(inst, "fragile")
    pid = fragile.ask("pid", timeout=10)
    with pytest.raises(ikos.ActorError) as info:
        fragile.ask("unpicklable", timeout=10)
    assert not isinstance(info.value, ikos.AskTimeout | ikos.ActorDeadError)
    assert "could not be encoded" in str(info.value)
    assert "generator" in str(info.value)
    assert fragile.ask("pid", timeout=10) == pid
    assert inst.status("fragile")["restarts"] == 0


class OnlyHere:
    """Pickled by reference to this test module, which actor processes cannot import."""


def test_a_message_the_actor_cannot_decode_is_answered_with_an_error(ikosd_factory):
    inst = ikosd_factory(
        tree=tree_source('ikos.Supervisor("root", children=[ikos.Child("sleeper", Sleeper)])')
    )
    sleeper = ref(inst, "sleeper")
    pid = inst.pid_of("sleeper")
    assert encode(OnlyHere())[:1] == b"p"
    t0 = time.monotonic()
    with pytest.raises(ikos.ActorError) as info:
        sleeper.ask(OnlyHere(), timeout=2 * HANG)
    # answered, not left to time out: the bound (on hangs) is half the ask's timeout
    assert time.monotonic() - t0 < HANG, "answered at once, not left to time out"
    assert not isinstance(info.value, ikos.AskTimeout | ikos.ActorDeadError | ikos.ActorCrashed)
    assert "could not decode" in str(info.value) and __name__ in str(info.value)
    # A tell of the same is dropped (and counted) without disturbing the next ask.
    sleeper.tell(OnlyHere())
    assert sleeper.ask("after", timeout=10) == ("echo", "after")
    assert inst.pid_of("sleeper") == pid
    inst.ctl("stop", "sleeper", check=True)
    assert inst.status("sleeper")["dead_letters"] == 1


def test_an_actor_reaches_another_by_name(ikosd_factory):
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("back", Back), '
            'ikos.Child("front", Front)])'
        )
    )
    answer = ref(inst, "front").ask({"q": 1}, timeout=10)
    assert answer == ("front", ("back", {"q": 1}, inst.pid_of("back")))


def test_dill_carries_lambdas_closures_and_local_classes_both_ways(ikosd_factory):
    inst = ikosd_factory(
        tree=tree_source('ikos.Supervisor("root", children=[ikos.Child("apply", Apply)])')
    )
    apply = ref(inst, "apply")

    def make_mul(k):
        def mul(x):
            return x * k

        return mul

    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def describe(self):
            return f"Point({self.x}, {self.y})"

    increment = lambda x: x + 1  # noqa: E731 - a lambda is the point
    triple = make_mul(3)
    for fn in (increment, triple):
        assert encode(("call", (fn, 1)))[:1] == b"d"
    result, back = apply.ask(("call", (increment, 3)), timeout=10)
    assert result == 4 and back(10) == 11
    result, back = apply.ask(("call", (triple, 3)), timeout=10)
    assert result == 9 and back(10) == 30
    text, point, cls = apply.ask(("object", Point(1, 2)), timeout=10)
    assert text == "Point(1, 2)"
    assert (point.x, point.y, point.describe()) == (1, 2, "Point(1, 2)")
    assert cls.__name__ == "Point" and cls(5, 6).describe() == "Point(5, 6)"
    # Functions made in the actor, from a module the test process cannot import.
    times, adder = apply.ask(("make", 7), timeout=10)
    assert times(2) == 14 and adder(2) == 9


def test_transparent_restart_after_sigkill(ikosd_factory):
    inst = ikosd_factory(
        tree=tree_source('ikos.Supervisor("root", children=[ikos.Child("fragile", Fragile)])')
    )
    fragile = ref(inst, "fragile")
    pid = fragile.ask("pid", timeout=10)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), message=f"pid {pid} to be reaped")
    # One call, no retry: the reference reconnects, and the connection waits in the
    # mailbox's backlog until the new incarnation serves it.
    new = fragile.ask("pid", timeout=15)
    assert new != pid
    assert inst.wait_state("fragile", "running")["pid"] == new
    assert inst.status("fragile")["restarts"] == 1


# -- dead letters ----------------------------------------------------------------


def test_tells_to_a_stopped_actor_are_dead_letters(ikosd_factory, caplog):
    inst = ikosd_factory(
        tree=tree_source('ikos.Supervisor("root", children=[ikos.Child("sleeper", Sleeper)])')
    )
    sleeper = ref(inst, "sleeper")
    assert sleeper.ask("hi", timeout=10) == ("echo", "hi")
    inst.ctl("stop", "sleeper", check=True)
    assert inst.status("sleeper")["dead_letters"] == 0
    before = _ref.dead_letter_count()
    with caplog.at_level("WARNING", logger="ikos.actors"):
        for i in range(3):
            sleeper.tell(("lost", i))  # pooled connection, then fresh ones: never raises
    assert _ref.dead_letter_count() == before + 3
    assert [r.getMessage() for r in caplog.records].count(
        "dead letter to actor 'sleeper': not running (no mailbox is listening)"
    ) == 3
    assert inst.status("sleeper")["dead_letters"] == 3
    wait_for(lambda: inst.log_text().count("dead letter to 'sleeper'") == 3)


def raw_client(inst: Instance, name: str):
    """An authenticated mailbox connection without ActorRef, to queue asks without blocking."""
    import socket

    paths = InstancePaths.for_root(inst.root)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        connect_unix(sock, paths.actor_socket(name))
        client_handshake(sock, read_secret(paths.secret_file), 10)
    except BaseException:
        sock.close()
        raise
    return sock


def read_frames(sock, count: int) -> list[object]:
    buf = b""
    out = []
    while len(out) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 4 and len(buf) >= 4 + HEADER.unpack_from(buf)[0]:
            (n,) = HEADER.unpack_from(buf)
            out.append(decode(buf[4 : 4 + n]))
            buf = buf[4 + n :]
    return out


def test_orderly_stop_answers_queued_asks_and_counts_queued_tells(ikosd_factory, tmp_path):
    gate = tmp_path / "gate"
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("slow", Gated, args=(GATE,))])',
            GATE=str(gate),
        )
    )
    slow = ref(inst, "slow")
    # Connect first: a busy actor cannot take part in a handshake.
    asker = raw_client(inst, "slow")
    slow.tell("hold")  # the actor now waits for the gate inside receive
    for i in range(5):
        slow.tell(f"queued-{i}")
    for corr in (1, 2):
        data = encode((ASK, corr, "count"))
        asker.sendall(HEADER.pack(len(data)) + data)
    stopper = subprocess.Popen(
        [IKOSCTL, "--root", str(inst.root), "stop", "slow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # "stopping" is reported only after SIGTERM was sent; then let "hold" finish.
        inst.wait_state("slow", "stopping")
        gate.touch()
        out, _ = stopper.communicate(timeout=30)
        assert stopper.returncode == 0, out
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait()
    replies = read_frames(asker, 2)
    asker.close()
    assert [(kind, corr) for kind, corr, _ in replies] == [(REPLY_ERR, 1), (REPLY_ERR, 2)]
    for _, _, err in replies:
        assert isinstance(err, ikos.ActorDeadError) and err.name == "slow"
    status = inst.status("slow")
    assert status["state"] == "stopped"
    assert status["dead_letters"] == 5
    assert status["last_exit"]["code"] == 0


def test_queued_asks_of_a_crashing_actor_get_actor_dead(ikosd_factory, tmp_path):
    gate = tmp_path / "gate"
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("slow", Gated, args=(GATE,))])',
            GATE=str(gate),
        )
    )
    asker = raw_client(inst, "slow")
    frames = [encode((TELL, 0, None))]  # None has no len(): receive raises
    frames += [encode((ASK, corr, "count")) for corr in (7, 8)]
    asker.sendall(b"".join(HEADER.pack(len(f)) + f for f in frames))
    gate.touch()
    replies = read_frames(asker, 2)
    asker.close()
    assert [(kind, corr) for kind, corr, _ in replies] == [(REPLY_ERR, 7), (REPLY_ERR, 8)]
    assert all(isinstance(err, ikos.ActorDeadError) for _, _, err in replies)


def test_asks_from_threads_each_get_their_own_reply(ikosd_factory):
    inst = ikosd_factory(
        tree=tree_source('ikos.Supervisor("root", children=[ikos.Child("sleeper", Sleeper)])')
    )
    sleeper = ref(inst, "sleeper")
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(200):
                assert sleeper.ask((i, j), timeout=30) == ("echo", (i, j))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_a_client_accepted_before_a_long_receive_is_not_dropped(ikosd_factory, tmp_path):
    """The handshake timeout measures the peer, not how long the actor was busy."""
    gate = tmp_path / "gate"
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("slow", Gated, args=(GATE,))])',
            GATE=str(gate),
        )
    )
    worker = raw_client(inst, "slow")  # connected before the actor gets busy
    ref(inst, "slow").tell("hold")  # busy until the gate opens
    with worker:
        # Connected and waiting in the backlog while the actor is busy ...
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with late:
            late.settimeout(_runtime.HANDSHAKE_TIMEOUT + 20)
            connect_unix(late, InstancePaths.for_root(inst.root).actor_socket("slow"))
            nonce_c = os.urandom(NONCE)
            late.sendall(MAGIC + nonce_c)
            # ... a message that keeps the actor busy past the handshake timeout ...
            data = encode((TELL, 0, ("sleep", _runtime.HANDSHAKE_TIMEOUT + 1.5)))
            worker.sendall(HEADER.pack(len(data)) + data)
            gate.touch()
            # ... and the late client still gets through once the actor is free.
            answer = b""
            while len(answer) < SERVER_LEN:
                chunk = late.recv(SERVER_LEN - len(answer))
                assert chunk, "dropped before the server answered"
                answer += chunk
            nonce_s = answer[:NONCE]
            secret = read_secret(InstancePaths.for_root(inst.root).secret_file)
            late.sendall(_mac(secret, b"client", nonce_s, nonce_c))
            data = encode((ASK, 1, "count"))
            late.sendall(HEADER.pack(len(data)) + data)
            assert read_frames(late, 1) == [(REPLY_OK, 1, 2)]
