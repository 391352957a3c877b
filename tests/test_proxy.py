"""Method proxies: ``ref.proxy().incr(5)`` through a real ikosd and real actor processes.

The rules of what may be called (``ikos.actors._call``) are checked twice: on
an actor instance in this process (fast, every rule) and through real
processes (arguments, results, remote errors with their traceback, refusals
answered without crashing the actor, timeouts). The typing of proxies is
checked by running mypy on two files, one that must pass and one whose marked
lines must fail.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
from conftest import HANG, Instance
from gate_source import GATE_SOURCE

import ikos
from ikos.actors._call import MethodCall
from ikos.actors._proxy import Proxy

HERE = Path(__file__).resolve().parent

ACTORS = (
    GATE_SOURCE
    + """

def explode(text):
    raise ValueError(f"kaboom {text}")


class Counter(ikos.Actor):
    limit = 10

    def on_start(self):
        self.count = 0

    def receive(self, message):
        return ("receive", message)

    def incr(self, k=1, *, times=1):
        self.count += k * times
        return self.count

    def echo(self, *args, **kwargs):
        return args, kwargs

    def values(self):
        return {"int": 1, "float": 2.5, "str": "s", "bytes": b"x", "list": [1, [2]],
                "none": None, "tuple": (1, "a"), "set": {3}}

    def fail(self, text):
        explode(text)

    def pid(self):
        return os.getpid()

    def gated(self, gate):
        wait_gate(gate)
        return "opened"

    @property
    def watched(self):
        open(MARKER, "w").close()  # proves the property ran
        return 1

    @staticmethod
    def double(x):
        return 2 * x

    @classmethod
    def kind(cls):
        return cls.__name__

    def _private(self):
        return "secret"
"""
)

TREE = (
    ACTORS
    + """
tree = ikos.Supervisor(
    "root", max_restarts=50, within=10, children=[ikos.Child("counter", Counter)]
)
"""
)


def start(ikosd_factory, tmp_path: Path) -> tuple[Instance, ikos.ActorRef[ikos.Actor]]:
    marker = tmp_path / "property-ran"
    inst = ikosd_factory(tree=f"MARKER = {str(marker)!r}\n" + TREE)
    return inst, ikos.ActorRef("counter", root=inst.root)


# -- the rules, on an instance in this process -----------------------------------


class Local(ikos.Actor):
    limit = 10

    def on_start(self) -> None:
        self.count = 0

    def incr(self, k: int = 1) -> int:
        self.count += k
        return self.count

    @property
    def watched(self) -> int:
        raise AssertionError("a refused property must not run")

    @staticmethod
    def double(x: int) -> int:
        return 2 * x

    def _private(self) -> str:
        return "secret"


@pytest.mark.parametrize(
    ("method", "reason"),
    [
        ("_private", "private"),
        ("__init__", "private"),
        ("receive", "ikos.Actor's API"),
        ("on_start", "ikos.Actor's API"),
        ("on_stop", "ikos.Actor's API"),
        ("stop", "ikos.Actor's API"),
        ("actor", "ikos.Actor's API"),
        ("ref", "ikos.Actor's API"),
        ("subscribe", "ikos.Actor's API"),
        ("unsubscribe", "ikos.Actor's API"),
        ("monitor", "ikos.Actor's API"),
        ("send_after", "ikos.Actor's API"),
        ("send_interval", "ikos.Actor's API"),
        ("get_state", "ikos.Actor's API"),
        ("set_state", "ikos.Actor's API"),
        ("name", "ikos.Actor's API"),
        ("missing", "Local has no method 'missing'"),
        ("count", "Local has no method 'count'"),  # an instance attribute
        ("limit", "an attribute of type int"),
        ("watched", "a property"),
    ],
)
def test_apply_refuses_what_is_not_a_public_method(method, reason):
    actor = Local()
    actor.name = "local"
    actor.on_start()
    refused = MethodCall(method, (), {}).apply(actor)
    assert isinstance(refused, ikos.MethodRefused)
    assert isinstance(refused, AttributeError)
    assert (refused.name, refused.method) == ("local", method)
    assert reason in refused.reason
    assert f"actor 'local': cannot call {method!r} through a proxy" in str(refused)
    # it survives the trip back to the caller
    again = pickle.loads(pickle.dumps(refused))
    assert (type(again), again.name, again.method, again.reason) == (
        ikos.MethodRefused,
        "local",
        method,
        refused.reason,
    )


def test_apply_calls_public_methods_and_refuses_malformed_calls():
    actor = Local()
    actor.name = "local"
    actor.on_start()
    assert MethodCall("incr", (4,), {}).apply(actor) == 4
    assert MethodCall("incr", (), {"k": 2}).apply(actor) == 6
    assert MethodCall("double", (21,), {}).apply(actor) == 42
    assert MethodCall.from_wire(("incr", (1,), {})).apply(actor) == 7
    for payload in ["incr", ("incr",), ("incr", [1], {}), (3, (), {}), ("incr", (), [])]:
        refused = MethodCall.from_wire(payload).apply(actor)
        assert isinstance(refused, ikos.MethodRefused), payload
        assert "malformed" in refused.reason
    refused = MethodCall(["x"], (), {}).apply(actor)  # type: ignore[arg-type]
    assert isinstance(refused, ikos.MethodRefused) and "not a string" in refused.reason


def test_a_proxy_refuses_private_names_and_the_base_api_without_asking():
    ref: ikos.ActorRef[ikos.Actor] = ikos.ActorRef("nowhere", root="/nonexistent")
    proxy = ref.proxy()
    for name in ["_private", "__deepcopy__", "receive", "stop", "on_start", "send_after"]:
        with pytest.raises(ikos.MethodRefused, match=f"actor 'nowhere': cannot call '{name}'"):
            getattr(proxy, name)
    assert not hasattr(proxy, "_anything")  # MethodRefused is an AttributeError
    with pytest.raises(ikos.MethodRefused, match="cannot set attributes"):
        proxy.count = 3
    # a method's callable is made once, then read as a plain attribute
    assert proxy.incr is proxy.incr
    assert isinstance(proxy, Proxy) and "proxy of ActorRef('nowhere')" in repr(proxy)


# -- through real processes ----------------------------------------------------


def test_arguments_keywords_defaults_and_results(ikosd_factory, tmp_path):
    _inst, ref = start(ikosd_factory, tmp_path)
    counter = ref.proxy(timeout=HANG)
    assert counter.incr() == 1  # default
    assert counter.incr(5) == 6  # positional
    assert counter.incr(k=2, times=3) == 12  # keywords, keyword-only
    assert counter.echo(1, "a", None, k=[1, 2]) == ((1, "a", None), {"k": [1, 2]})
    assert counter.values() == {
        "int": 1,
        "float": 2.5,
        "str": "s",
        "bytes": b"x",
        "list": [1, [2]],
        "none": None,
        "tuple": (1, "a"),
        "set": {3},
    }
    assert counter.double(21) == 42  # staticmethod
    assert counter.kind() == "Counter"  # classmethod
    # a function as an argument goes by dill, as for ask
    assert counter.echo(lambda x: x)[0][0](7) == 7
    # the proxy and plain asks share the actor (and the thread's connection)
    assert ref.ask("hello", timeout=HANG) == ("receive", "hello")
    assert ref.proxy().incr(0) == 12
    # a proxy's future form
    futures = [counter.incr.future(1) for _ in range(50)]
    assert [f.result(timeout=HANG) for f in futures] == list(range(13, 63))
    fp = ref.future_proxy(timeout=HANG)
    assert fp.incr(10).result(timeout=HANG) == 72
    assert fp.echo(k=1).result(timeout=HANG) == ((), {"k": 1})


def test_remote_errors_carry_type_message_and_traceback(ikosd_factory, tmp_path):
    inst, ref = start(ikosd_factory, tmp_path)
    counter = ref.proxy(timeout=HANG)
    pid = counter.pid()
    with pytest.raises(ikos.ActorCrashed) as info:
        counter.fail("seven")
    err = info.value
    assert err.name == "counter" and err.exc_type == "ValueError"
    assert "ValueError: kaboom seven" in err.message
    assert err.message.startswith("fail() raised"), err.message  # the method, not "receive"
    assert "in explode" in err.traceback and "kaboom seven" in err.traceback
    # a crash in a method is a crash: the supervisor restarts the actor
    inst.wait_running_new_pid("counter", pid, timeout=HANG)
    assert counter.pid() != pid
    # the future form fails the same way
    with pytest.raises(ikos.ActorCrashed, match="kaboom eight"):
        counter.fail.future("eight").result(timeout=HANG)


def test_refused_calls_are_answered_without_crashing_the_actor(ikosd_factory, tmp_path):
    inst, ref = start(ikosd_factory, tmp_path)
    counter = ref.proxy(timeout=HANG)
    pid = counter.pid()
    cases = {
        "missing": "Counter has no method 'missing'",
        "count": "Counter has no method 'count'",
        "limit": "an attribute of type int",
        "watched": "a property",
    }
    for method, reason in cases.items():
        with pytest.raises(ikos.MethodRefused) as info:
            getattr(counter, method)()
        assert (info.value.name, info.value.method) == ("counter", method)
        assert reason in info.value.reason
        with pytest.raises(ikos.MethodRefused, match=re.escape(reason)):
            getattr(counter, method).future().result(timeout=HANG)
    assert not (tmp_path / "property-ran").exists()  # refused before it ran
    # the actor checks for itself what a proxy refuses locally: a raw call
    for method in ["_private", "receive", "stop", "on_start", "__class__"]:
        with pytest.raises(ikos.MethodRefused) as info:
            ref._call((method, HANG))
        assert info.value.method == method
    # a MethodCall sent by a plain ask is refused the same way, as a value
    refused = ref.ask(MethodCall("_private", (), {}), timeout=HANG)
    assert isinstance(refused, ikos.MethodRefused) and "private" in refused.reason
    assert ref.ask(MethodCall("incr", (2,), {}), timeout=HANG) == 2
    # none of this stopped or restarted it
    assert counter.pid() == pid
    assert inst.status("counter")["restarts"] == 0


class Unimportable:
    """Defined here: the actor's process cannot import this test module."""


def test_an_argument_the_actor_cannot_decode_is_answered_at_once(ikosd_factory, tmp_path):
    _inst, ref = start(ikosd_factory, tmp_path)
    counter = ref.proxy(timeout=HANG)
    with pytest.raises(ikos.ActorError, match="could not decode the message") as info:
        counter.echo(Unimportable())
    assert not isinstance(info.value, ikos.AskTimeout)  # answered, not left to time out
    with pytest.raises(ikos.ActorError, match="could not decode the message") as info:
        counter.echo.future(Unimportable()).result(timeout=HANG)
    assert not isinstance(info.value, ikos.AskTimeout)
    assert counter.incr(1) == 1  # and the actor goes on


def test_a_proxy_call_times_out(ikosd_factory, tmp_path):
    _inst, ref = start(ikosd_factory, tmp_path)
    gate = tmp_path / "gate"
    with pytest.raises(ikos.AskTimeout, match=r"no reply within 0\.3 s"):
        ref.proxy(timeout=0.3).gated(str(gate))
    gate.touch()
    # the late reply is skipped; the next call gets its own answer
    assert ref.proxy(timeout=HANG).incr(3) == 3


def test_a_typed_reference_pickles_and_proxies_after_the_trip(ikosd_factory, tmp_path):
    inst, ref = start(ikosd_factory, tmp_path)
    typed: ikos.ActorRef[ikos.Actor] = ikos.ActorRef[ikos.Actor]("counter", root=inst.root)
    again = pickle.loads(pickle.dumps(typed))
    assert again == typed == ref and hash(again) == hash(ref)
    assert type(again) is ikos.ActorRef and again.name == "counter"
    assert again.proxy(timeout=HANG).incr(4) == 4
    # a proxy and a proxy's method travel too (say, as a callback in a message)
    proxy = pickle.loads(pickle.dumps(typed.proxy(timeout=HANG)))
    incr = pickle.loads(pickle.dumps(proxy.incr))
    assert incr(0) == 4 and incr.future(0).result(timeout=HANG) == 4
    # in another process too
    code = (
        "import pickle, sys; ref = pickle.loads(sys.stdin.buffer.read()); "
        f"print(ref.proxy(timeout={HANG}).incr(1))"
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(typed),
        capture_output=True,
        timeout=HANG * 2,
        env={**os.environ, "IKOS_TEST_MARK": inst.mark},
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "5"


# -- typing --------------------------------------------------------------------


def run_mypy(path: Path, tmp_path: Path) -> tuple[str, int]:
    from mypy import api

    stdout, stderr, status = api.run(
        [
            "--strict",
            "--follow-imports=silent",
            "--no-error-summary",
            "--show-error-codes",
            "--cache-dir",
            str(HERE.parent / ".mypy_cache" / "typing-tests"),
            "--config-file",
            "",
            str(path),
        ]
    )
    return stdout + stderr, status


def test_proxies_type_check_with_mypy(tmp_path):
    good, status = run_mypy(HERE / "typing_proxy_good.py", tmp_path)
    assert status == 0, good
    bad_file = HERE / "typing_proxy_bad.py"
    bad, status = run_mypy(bad_file, tmp_path)
    assert status == 1, bad
    expected = {
        (n, m.group(1))
        for n, line in enumerate(bad_file.read_text().splitlines(), 1)
        if (m := re.search(r"# error: ([a-z-]+)", line))
    }
    found = {
        (int(m.group(1)), m.group(2))
        for m in re.finditer(r"typing_proxy_bad\.py:(\d+): error: .*\[([a-z-]+)\]", bad)
    }
    assert expected and found == expected, bad
