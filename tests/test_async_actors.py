"""Async actors through real processes: the asyncio runtime's semantics.

Handlers record what they do (``start``/``end`` of each message) so that the
tests can check order and overlap from the records rather than from timing;
where a handler must be blocked at a known moment it awaits a condition the
test controls (a connection to a socket the test holds, a gate file), never
a guessed sleep.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import HANG, IKOSCTL, Instance, wait_for
from test_mailbox import raw_client, read_frames

import ikos
from ikos._codec import encode
from ikos.actors._async_runtime import check_concurrency
from ikos.actors._call import MethodCall
from ikos.actors._ref import ASK, REPLY_ERR, REPLY_OK, TELL
from ikos.actors._runtime import is_async_actor
from ikos.platform._wire import HEADER

ACTORS = """
import asyncio
import os
import time

import ikos


async def wait_gate(path):
    deadline = time.monotonic() + 120  # the test's own waits fail long before
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate {path} never opened")
        await asyncio.sleep(0.005)


class Worker(ikos.Actor):
    \"\"\"Records ("start"|"end", id) around each ("work", id, seconds) it awaits.\"\"\"

    def on_start(self):
        self.log = []
        self.peer_started = None

    async def receive(self, message):
        kind = message[0]
        if kind == "work":
            _, ident, seconds = message
            self.log.append(("start", ident))
            await asyncio.sleep(seconds)
            self.log.append(("end", ident))
            return ident
        if kind == "log":
            return self.log
        if kind == "pid":
            return os.getpid()
        if kind == "read":  # a line from a socket the test serves
            reader, writer = await asyncio.open_unix_connection(message[1])
            try:
                return (await reader.readline()).decode()
            finally:
                writer.close()
        if kind == "pair":  # finishes only once another "pair" handler has started
            if self.peer_started is None:
                self.peer_started = asyncio.Event()
                await asyncio.wait_for(self.peer_started.wait(), 60)
                return "first"
            self.peer_started.set()
            return "second"
        if kind == "boom":
            await asyncio.sleep(0)
            raise ValueError(f"kaboom {message[1]}")
        if kind == "gate":
            open(message[1] + ".busy", "w").close()
            await wait_gate(message[1])
            return "opened"
        if kind == "sleep":
            await asyncio.sleep(message[1])
            return ("slept", message[1])
        if kind == "size":
            return type(message[1]).__name__, len(message[1]), bytes(message[1][:3])
        if kind == "big":
            return b"z" * message[1]
        if kind == "relay":  # a blocking ask, off the loop as the guide says
            _, name, payload = message
            peer = self.actor(name)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, lambda: peer.ask(payload, timeout=10))
        if kind == "quit":  # stop after this message, as a normal exit
            await asyncio.sleep(0)
            self.stop()
            return "bye"
        self.log.append(message)
        return None

    async def fetch(self, key, *, twice=False):
        await asyncio.sleep(0)
        return key * 2 if twice else key

    def plain(self, x):
        return x + 1


class Concurrent(Worker):
    max_concurrency = 4


class Echo(ikos.Actor):
    def receive(self, message):
        return ("echo", message)


class Hooks(ikos.Actor):
    \"\"\"Synchronous receive, async hooks: the asyncio runtime runs it too.\"\"\"

    def __init__(self, out):
        self.out = out

    async def on_start(self):
        await asyncio.sleep(0.01)
        self.state = "started"

    def receive(self, message):
        return self.state

    async def on_stop(self):
        await asyncio.sleep(0.01)
        with open(self.out, "w") as f:
            f.write("stopped cleanly")


class Gated(Worker):
    \"\"\"Handles nothing until its gate opens; counts what it handled.\"\"\"

    def __init__(self, gate):
        self.gate = gate

    async def receive(self, message):
        if message == "count":
            return len(self.log)
        open(self.gate + ".busy", "w").close()
        await wait_gate(self.gate)
        self.log.append(len(message))


class GatedConcurrent(Gated):
    max_concurrency = 3


class Bad(Worker):
    max_concurrency = 0
"""


def tree_source(children: str, **constants: object) -> str:
    consts = "".join(f"{k} = {v!r}\n" for k, v in constants.items())
    return f"{ACTORS}\n{consts}\ntree = {children}\n"


def single(name: str, cls: str, extra: str = "", **constants: object) -> str:
    return tree_source(
        f'ikos.Supervisor("root", children=[ikos.Child("{name}", {cls}{extra})])', **constants
    )


def ref(inst: Instance, name: str) -> ikos.ActorRef:
    return ikos.ActorRef(name, root=inst.root)


class LineServer:
    """A Unix socket the actor connects to; the test decides when a line is sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(HANG)

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        return conn

    def close(self) -> None:
        self.sock.close()


def ask_in_thread(actor: ikos.ActorRef, message: object) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        try:
            result.append(actor.ask(message, timeout=HANG))
        except BaseException as exc:  # checked by the test
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


# -- awaiting I/O ------------------------------------------------------------------


def test_an_actor_awaiting_io_lets_others_and_itself_answer(ikosd_factory, tmp_path):
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("reader", Concurrent), '
            'ikos.Child("other", Echo)])'
        )
    )
    reader, other = ref(inst, "reader"), ref(inst, "other")
    server = LineServer(tmp_path / "lines.sock")
    try:
        thread, result = ask_in_thread(reader, ("read", str(server.path)))
        conn = server.accept()  # the actor is now awaiting its read
        with conn:
            # another actor answers, and so does this one (max_concurrency 4)
            assert other.ask("x", timeout=10) == ("echo", "x")
            assert reader.ask(("work", 1, 0), timeout=10) == 1
            assert reader.ask(("pid",), timeout=10) == inst.pid_of("reader")
            assert reader.ask(("relay", "other", "via"), timeout=10) == ("echo", "via")
            assert result == [] and thread.is_alive()
            conn.sendall(b"hello from the test\n")
            thread.join(HANG)
        assert result == ["hello from the test\n"]
    finally:
        server.close()


def test_one_at_a_time_by_default_even_across_awaits(ikosd_factory, tmp_path):
    inst = ikosd_factory(tree=single("w", "Worker"))
    worker = ref(inst, "w")
    server = LineServer(tmp_path / "lines.sock")
    try:
        thread, result = ask_in_thread(worker, ("read", str(server.path)))
        conn = server.accept()  # the handler is suspended in its read
        with conn:
            # a message from another connection waits for it, however long
            with pytest.raises(ikos.AskTimeout):
                worker.ask(("work", 1, 0), timeout=0.5)
            conn.sendall(b"done\n")
            thread.join(HANG)
        assert result == ["done\n"]
    finally:
        server.close()
    # Later messages with shorter awaits still run in mailbox order, each alone.
    for i in range(6):
        worker.tell(("work", i, 0.03 * (6 - i)))
    assert worker.ask(("log",), timeout=HANG)[-12:] == [
        (step, i) for i in range(6) for step in ("start", "end")
    ]


def test_max_concurrency_runs_handlers_together(ikosd_factory):
    # "pair" finishes only once a second "pair" handler ran alongside it
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("c", Concurrent), '
            'ikos.Child("w", Worker)])'
        )
    )
    concurrent = ref(inst, "c")
    concurrent.tell(("pair",))
    assert concurrent.ask(("pair",), timeout=HANG) == "second"
    # overlap in the records: six sleeps of decreasing length, four at a time
    for i in range(6):
        concurrent.tell(("work", i, 0.05 * (6 - i)))
    wait_for(lambda: len(concurrent.ask(("log",), timeout=10)) == 12, HANG)
    log = concurrent.ask(("log",), timeout=10)
    starts = [i for step, i in log if step == "start"]
    assert starts == list(range(6))  # taken in mailbox order
    assert log.index(("start", 3)) < log.index(("end", 0))  # four ran together
    assert max(_running(log)) == 4  # never more than max_concurrency
    # with the default limit the same pair would wait for each other: one at a time
    serial = ref(inst, "w")
    serial.tell(("pair",))
    with pytest.raises(ikos.AskTimeout):
        serial.ask(("pair",), timeout=0.5)


def _running(log: list[tuple[str, int]]) -> list[int]:
    running, counts = 0, []
    for step, _ in log:
        running += 1 if step == "start" else -1
        counts.append(running)
    return counts


def test_async_methods_are_called_through_method_calls(ikosd_factory):
    inst = ikosd_factory(tree=single("w", "Worker"))
    worker = ref(inst, "w")
    assert worker.ask(MethodCall("fetch", ("k",), {}), timeout=10) == "k"
    assert worker.ask(MethodCall("fetch", ("k",), {"twice": True}), timeout=10) == "kk"
    assert worker.ask(MethodCall("plain", (1,), {}), timeout=10) == 2  # a plain one too


def test_shared_memory_messages_and_replies(ikosd_factory):
    inst = ikosd_factory(tree=single("w", "Worker"))
    worker = ref(inst, "w")
    big = 1 << 20  # above the default threshold: the reply goes by memfd
    assert worker.ask(("size", b"a" * big), timeout=10) == ("bytes", big, b"aaa")
    reply = worker.ask(("big", big), timeout=10)
    assert isinstance(reply, memoryview) and reply.nbytes == big and bytes(reply[:2]) == b"zz"
    assert worker.ask(("pid",), timeout=10) == inst.pid_of("w")


# -- hooks -------------------------------------------------------------------------


def test_async_on_start_and_on_stop(ikosd_factory, tmp_path):
    out = tmp_path / "on_stop.txt"
    inst = ikosd_factory(tree=single("h", "Hooks", ", args=(OUT,)", OUT=str(out)))
    hooks = ref(inst, "h")
    assert hooks.ask("state?", timeout=10) == "started"
    inst.ctl("stop", "h", check=True)
    assert out.read_text() == "stopped cleanly"
    assert inst.status("h")["last_exit"]["code"] == 0


# -- failures and stopping ---------------------------------------------------------


def test_a_crash_in_an_async_handler_answers_actor_crashed_and_restarts(ikosd_factory):
    inst = ikosd_factory(tree=single("c", "Concurrent"))
    actor = ref(inst, "c")
    pid = actor.ask(("pid",), timeout=10)
    # a second handler is suspended when the first crashes: its ask is answered too
    thread, result = ask_in_thread(ikos.ActorRef("c", root=inst.root), ("work", "long", 3600))
    wait_for(lambda: ("start", "long") in actor.ask(("log",), timeout=10))
    with pytest.raises(ikos.ActorCrashed) as info:
        actor.ask(("boom", 7), timeout=10)
    err = info.value
    assert err.name == "c" and err.exc_type == "ValueError"
    assert "kaboom 7" in str(err) and "in receive" in err.traceback
    assert err.message.startswith("receive raised"), err.message
    thread.join(HANG)
    assert len(result) == 1 and isinstance(result[0], ikos.ActorDeadError), result
    new = inst.wait_running_new_pid("c", pid)
    assert actor.ask(("pid",), timeout=10) == new
    assert inst.status("c")["last_exit"]["code"] == 1


def test_sigterm_with_handlers_in_flight(ikosd_factory, tmp_path):
    gate = tmp_path / "gate"
    inst = ikosd_factory(tree=single("c", "Concurrent"))
    asker = raw_client(inst, "c")
    frames = [
        encode((ASK, 1, ("gate", str(gate)))),  # finishes within the grace
        encode((ASK, 2, ("sleep", 3600))),  # cancelled after it
        encode((ASK, 3, ("sleep", 3600))),
        encode((ASK, 4, ("sleep", 3600))),  # the fourth running handler
        encode((ASK, 5, ("work", 5, 0))),  # queued behind them
        encode((TELL, 0, ("work", 6, 0))),  # queued: a dead letter
    ]
    asker.sendall(b"".join(HEADER.pack(len(f)) + f for f in frames))
    wait_for(lambda: Path(f"{gate}.busy").exists(), message="the gated handler")
    stopper = subprocess.Popen(
        [IKOSCTL, "--root", str(inst.root), "stop", "c"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        inst.wait_state("c", "stopping")  # SIGTERM sent: now let the first finish
        gate.touch()
        out, _ = stopper.communicate(timeout=HANG)
        assert stopper.returncode == 0, out
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait()
    replies = read_frames(asker, 5)
    asker.close()
    assert replies[0] == (REPLY_OK, 1, "opened")
    assert sorted(corr for _, corr, _ in replies[1:]) == [2, 3, 4, 5]
    for kind, _, err in replies[1:]:
        assert kind == REPLY_ERR and isinstance(err, ikos.ActorDeadError), err
    status = inst.status("c")
    assert status["state"] == "stopped" and status["last_exit"]["code"] == 0
    assert status["dead_letters"] == 1


def test_stop_from_an_async_handler_is_a_normal_exit(ikosd_factory):
    inst = ikosd_factory(tree=single("w", "Worker", ', restart="transient"'))
    worker = ref(inst, "w")
    asker = raw_client(inst, "w")
    frames = [encode((ASK, 1, ("quit",))), encode((ASK, 2, ("pid",)))]
    asker.sendall(b"".join(HEADER.pack(len(f)) + f for f in frames))
    replies = read_frames(asker, 2)
    asker.close()
    assert replies[0] == (REPLY_OK, 1, "bye")
    assert replies[1][:2] == (REPLY_ERR, 2) and isinstance(replies[1][2], ikos.ActorDeadError)
    status = inst.wait_state("w", "stopped")
    assert status["last_exit"]["code"] == 0 and status["restarts"] == 0
    with pytest.raises(ikos.ActorDeadError):
        worker.ask(("pid",), timeout=10)


# -- back-pressure -----------------------------------------------------------------


@pytest.mark.parametrize("cls", ["Gated", "GatedConcurrent"])
def test_a_slow_async_handler_fills_the_bounded_mailbox(ikosd_factory, tmp_path, cls):
    gate = tmp_path / "gate"
    inst = ikosd_factory(tree=single("slow", cls, ", args=(GATE,), mailbox_size=2", GATE=str(gate)))
    slow = ref(inst, "slow")
    payload = b"x" * 65536
    accepted = 0
    for _ in range(500):  # kernel buffers hold a few; the bound must bite long before
        t0 = time.monotonic()
        try:
            slow.tell(payload, timeout=0.5)
        except ikos.MailboxFull:
            assert time.monotonic() - t0 >= 0.45
            break
        accepted += 1
    else:
        pytest.fail("500 tells of 64 KiB to a blocked async actor never blocked")
    assert accepted >= 2
    gate.touch()
    assert wait_for(lambda: slow.ask("count", timeout=10) == accepted, HANG)


# -- choosing the runtime ----------------------------------------------------------


def test_the_runtime_is_chosen_from_the_class():
    class Plain(ikos.Actor):
        def receive(self, message: object) -> object:
            return message

    class AsyncReceive(ikos.Actor):
        async def receive(self, message: object) -> object:
            return message

    class AsyncMethod(Plain):
        async def lookup(self, key: str) -> str:
            return key

    class AsyncStop(Plain):
        async def on_stop(self) -> None:
            pass

    class PrivateAsync(Plain):
        async def _helper(self) -> None:
            pass

    assert not is_async_actor(Plain) and not is_async_actor(PrivateAsync)
    assert is_async_actor(AsyncReceive) and is_async_actor(AsyncMethod)
    assert is_async_actor(AsyncStop)
    assert check_concurrency(AsyncReceive) == 1
    for bad in (0, -1, 1.5, True, "4"):
        cls = type("Bad", (AsyncReceive,), {"max_concurrency": bad})
        with pytest.raises(
            ValueError, match=rf"Bad.max_concurrency: expected an integer >= 1, got {bad!r}"
        ):
            check_concurrency(cls)


def test_a_bad_max_concurrency_fails_the_start_with_a_clear_reason(ikosd_factory):
    inst = ikosd_factory(tree=single("bad", "Bad", ', restart="temporary"'))
    status = inst.wait_state("bad", "failed")
    assert "Bad.max_concurrency: expected an integer >= 1, got 0" in str(status["last_exit"])
