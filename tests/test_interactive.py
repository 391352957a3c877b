"""Actors defined interactively: ``ikos.spawn`` and ``with ikos.local()``, on real processes.

The scripts run by the venv's python as a user runs theirs, so that their
classes really live in ``__main__`` (or inside a function) of another
process; every process started carries ``IKOS_TEST_MARK``, and a test ends
by checking that none is left and that the temporary root is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, Instance, alive, kill_marked, left_behind, read_line, wait_for

import ikos
import ikos.registry as ikos_registry
from ikos.actors._carried import carry
from ikos.ipc._client import instance_paths as ipc_instance_paths
from ikos.manager._local import carried_tree

IDLE_TREE = """
import ikos

class Idle(ikos.Actor):
    def receive(self, message):
        return message

tree = ikos.Supervisor("root", children=[ikos.Child("idle", Idle)])
"""

#: Helpers every script starts with: ask until the actor answers again.
PRELUDE = """
import os, signal, sys, time
import ikos

def ask_again(ref, message, deadline=60.0):
    end = time.monotonic() + deadline
    while True:
        try:
            return ref.ask(message, timeout=10)
        except ikos.IkosError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
"""


def run_script(
    tmp_path: Path, source: str, env: dict[str, str], name: str = "script.py"
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / name
    script.write_text(PRELUDE + textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=HANG * 6,
        env=env,
        cwd=tmp_path,
    )


def answers(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON line the script printed last (its findings), or the failure in full."""
    assert result.returncode == 0, f"script failed ({result.returncode}):\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture
def mark(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh ``IKOS_TEST_MARK`` in this process's environment (so in every child's);
    after the test none of its processes may be alive."""
    value = uuid.uuid4().hex
    monkeypatch.setenv("IKOS_TEST_MARK", value)
    yield value
    left = left_behind(value)
    kill_marked(value)
    assert left is None, left


# --- ikos.spawn on a running ikosd ---------------------------------------------------------


def test_spawn_class_from_main_restarts_from_the_same_bytes(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    inst = ikosd_factory(tree=IDLE_TREE)
    result = run_script(
        tmp_path,
        """
        import json
        FACTOR = 3

        def triple(x):
            return x * FACTOR

        class Counter(ikos.Actor):
            bump = staticmethod(lambda x: x + 1)

            def __init__(self, start, step=1):
                self.n = start
                self.step = step

            def receive(self, message):
                if message == "pid":
                    return os.getpid()
                self.n = self.bump(self.n) + triple(message) * self.step
                return self.n

        counter = ikos.spawn(Counter, 10, step=2)
        first = counter.ask(1, timeout=10)
        pid = counter.ask("pid", timeout=10)
        os.kill(pid, signal.SIGKILL)
        while (new_pid := ask_again(counter, "pid")) == pid:
            time.sleep(0.05)
        again = ask_again(counter, 1)
        other = ikos.spawn(Counter, 0)
        print(json.dumps({"name": counter.name, "first": first, "again": again,
                          "pid": pid, "new_pid": new_pid, "other": other.name}))
        """,
        inst.env,
    )
    found = answers(result)
    assert found["name"] == "Counter.1" and found["other"] == "Counter.2"
    # (10 + 1) + 3 * 1 * 2; the restarted incarnation starts again from the same arguments
    assert found["first"] == 17 and found["again"] == 17
    assert found["new_pid"] != found["pid"]
    status = inst.status("Counter.1")
    assert status["supervisor"] == "ikos-spawned"
    assert status["restarts"] == 1 and status["target"] == "__main__:Counter"
    ikos.terminate_child("Counter.1", root=inst.root)
    wait_for(lambda: inst.ctl("status", "Counter.1").returncode == 4, message="Counter.1 gone")
    assert inst.state("Counter.2") == "running"
    assert not alive(found["new_pid"])


def test_spawn_class_with_a_closure_made_in_a_function(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    inst = ikosd_factory(tree=IDLE_TREE)
    # a module of the user's own, beside the script: named, not copied, in the stream
    (tmp_path / "helpers.py").write_text("import struct\nPACK = struct.Struct('!I')\n")
    result = run_script(
        tmp_path,
        """
        import json
        import helpers

        def make_scaler(factor):
            offset = factor + 1

            class Scaler(ikos.Actor):
                scale = staticmethod(lambda x: x * factor + offset)

                def receive(self, message):
                    size = helpers.PACK.size
                    return [self.scale(message), type(self).__qualname__, size]

            return Scaler

        ref = ikos.spawn(make_scaler(4), name="scaler")
        print(json.dumps({"name": ref.name, "answer": ref.ask(5, timeout=10)}))
        """,
        inst.env,
    )
    assert answers(result) == {"name": "scaler", "answer": [25, "make_scaler.<locals>.Scaler", 4]}


def test_importable_class_goes_by_reference(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    """The actor process imports the module (found from the script's directory): its
    class is the module's own, not a copy."""
    inst = ikosd_factory(tree=IDLE_TREE)
    (tmp_path / "shapes.py").write_text(
        textwrap.dedent(
            """
            import sys
            import ikos

            class Square(ikos.Actor):
                def receive(self, side):
                    module = sys.modules[type(self).__module__]
                    return [side * side, type(self) is module.Square, module.__file__]
            """
        )
    )
    result = run_script(
        tmp_path,
        """
        import json
        from ikos.actors._carried import carry
        from shapes import Square

        ref = ikos.spawn(Square)
        by_value = carry(Square, name="x").by_value
        print(json.dumps({"answer": ref.ask(7, timeout=10), "by_value": by_value}))
        """,
        inst.env,
    )
    found = answers(result)
    assert found["by_value"] is False
    assert found["answer"] == [49, True, str(tmp_path / "shapes.py")]


def test_spawn_with_a_taken_name_is_refused(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    inst = ikosd_factory(tree=IDLE_TREE)
    result = run_script(
        tmp_path,
        """
        import json

        class Echo(ikos.Actor):
            def receive(self, message):
                return message

        try:
            ikos.spawn(Echo, name="idle")
        except ikos.ManagerError as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        """,
        inst.env,
    )
    found = answers(result)
    assert found["error"] == "DaemonExists" and "idle" in found["message"]


def test_a_class_that_does_not_load_in_the_actor_is_a_clear_start_failure(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    """The class's module is gone by the time the actor process loads it: the spawn
    fails naming the class and the import, and nothing is kept."""
    inst = ikosd_factory(tree=IDLE_TREE)
    (tmp_path / "vanishing").mkdir()
    (tmp_path / "vanishing" / "ghost.py").write_text("VALUE = 1\n")
    result = run_script(
        tmp_path,
        """
        import json, shutil
        sys.path.insert(0, os.path.abspath("vanishing"))
        import ghost
        shutil.rmtree("vanishing")

        class Haunted(ikos.Actor):
            def receive(self, message):
                return ghost.VALUE

        try:
            ikos.spawn(Haunted, name="haunted")
        except ikos.ManagerError as exc:
            print(json.dumps({"code": exc.code, "message": str(exc)}))
        """,
        inst.env,
    )
    found = answers(result)
    assert found["code"] == "spawn_error"
    assert "__main__:Haunted" in found["message"] and "ghost" in found["message"]
    assert inst.ctl("status", "haunted").returncode == 4


def test_spawned_actors_outlive_a_configuration_reload(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    config = '[ikosd]\nmetrics = false\n\n[actors.echo]\nclass = "examples.actors:Echo"\n'
    inst = ikosd_factory(config=config)
    result = run_script(
        tmp_path,
        """
        import json

        class Keeper(ikos.Actor):
            def receive(self, message):
                return os.getpid()

        print(json.dumps({"pid": ikos.spawn(Keeper, name="keeper").ask(0, timeout=10)}))
        """,
        inst.env,
    )
    pid = answers(result)["pid"]
    (inst.root.parent / "ikos.toml").write_text(
        config + '\n[actors.more]\nclass = "examples.actors:Echo"\n'
    )
    res = inst.ctl("reload-config", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["removed"] == []
    assert inst.status("keeper")["pid"] == pid and inst.state("more") == "running"
    assert ikos.ActorRef("keeper", root=inst.root).ask(0, timeout=10) == pid


class _Witness:
    """Unpickling it writes the unpickling process's pid to a file: who ran the code?"""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        code = f"import os; open({str(self.path)!r}, 'a').write(f'{{os.getpid()}}\\n')"
        return (exec, (code,))


def test_ikosd_never_unpickles_what_spawn_carries(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    """The payload runs code when unpickled: it must run in the actor's process (which
    then fails to start, the payload being no class), never in ikosd's."""
    import base64
    import pickle

    from ikos.platform._control import ControlClient
    from ikos.platform._paths import InstancePaths

    inst = ikosd_factory(tree=IDLE_TREE)
    witness = tmp_path / "unpickled-by"
    payload = b"p" + pickle.dumps(_Witness(witness))
    request = {"class": "__main__:Nothing", "payload": base64.b64encode(payload).decode()}
    with ControlClient(InstancePaths.for_root(inst.root)) as client:
        with pytest.raises(ikos.ManagerError) as caught:
            client.call("spawn", {**request, "name": "witness"})
        assert caught.value.code == "spawn_error"
        for bad in ({"payload": "not base64!"}, {"class": ""}, {"path": ["relative"]}):
            with pytest.raises(ikos.ManagerError) as refused:
                client.call("spawn", {**request, **bad})
            assert refused.value.code == "bad_request", bad
    unpickled_by = [int(pid) for pid in witness.read_text().split()]
    assert unpickled_by and inst.pid not in unpickled_by
    assert inst.ctl("status", "witness").returncode == 4


# --- errors raised before anything is sent ------------------------------------------------


def test_spawn_without_a_running_ikosd_says_so(tmp_path: Path) -> None:
    class Echo(ikos.Actor):
        def receive(self, message: Any) -> Any:
            return message

    with pytest.raises(ikos.ManagerUnavailable, match=r"no ikosd answers at .*ikosd\.sock"):
        ikos.spawn(Echo, root=tmp_path / "nothing")


def test_a_class_dill_cannot_serialize_is_named() -> None:
    class Streaming(ikos.Actor):
        source = (i for i in range(3))  # a generator: neither pickle nor dill carry it

    with pytest.raises(ikos.SpawnError) as caught:
        ikos.spawn(Streaming)
    message = str(caught.value)
    assert "Streaming" in message and "generator" in message and "dill" in message


def test_only_actor_classes_are_spawned() -> None:
    with pytest.raises(ikos.SpawnError, match=r"subclass of ikos\.Actor"):
        ikos.spawn(dict)


def test_carry_by_value_only_what_cannot_be_imported() -> None:
    class Local(ikos.Actor):
        pass

    assert not carry(ikos.Actor, name="a").by_value  # importable: by reference
    carried = carry(Local, (1,), {"k": 2}, name="b")
    assert carried.by_value
    cls, args, kwargs = carried.load()
    assert cls.__qualname__.endswith("Local") and args == (1,) and kwargs == {"k": 2}
    assert cls is not Local  # a copy made from the bytes, as in the actor process


# --- ikos.local ----------------------------------------------------------------------------


class Doubler(ikos.Actor):
    def receive(self, message: Any) -> Any:
        if message == "paths":  # where this actor would keep its files
            return [str(p) for p in (self.paths.root, self.paths.state_dir, self.paths.run_dir)]
        return message * 2


def test_local_system_runs_and_leaves_nothing(mark: str) -> None:
    class Greeter(ikos.Actor):  # defined in a function: carried by value
        def __init__(self, greeting: str) -> None:
            self.greeting = greeting

        def receive(self, message: Any) -> Any:
            return f"{self.greeting}, {message}"

    with ikos.local() as system:
        root = system.root
        assert (root / "run" / "ikos" / "ikosd.sock").exists()
        hello = ikos.spawn(Greeter, "hello")  # no root: the open local system's
        assert hello.ask("world", timeout=10) == "hello, world"
        doubler = system.spawn(Doubler, name="doubler")
        assert system.ref("doubler").ask(21, timeout=10) == 42
        # an actor's own instance directories: under the private instance's root
        assert doubler.ask("paths", timeout=10) == [
            str(root),
            str(root / "var" / "lib" / "ikos"),
            str(root / "run" / "ikos"),
        ]
        # every client API without a root means the open system, as ikos.spawn does
        # (the daemon and registry clients went to the default instance)
        assert ikos.daemon.status("doubler").state == "running"
        assert isinstance(ikos_registry.list(), list)
        assert ipc_instance_paths(None).root == root
        system.stop(hello.name)
        with pytest.raises(ikos.ActorError):
            hello.ask("again", timeout=5)
        assert doubler.ask(1, timeout=10) == 2
        ikosd_pid = system.pid
    assert ikosd_pid is not None and not alive(ikosd_pid)
    assert not root.exists()


def test_an_actor_spawns_into_its_own_instance(mark: str) -> None:
    """In an actor's process ``ikos.spawn`` needs no root: the actor's instance is meant
    (the private ikosd's actors have no ``$IKOS_ROOT`` to go by)."""

    class Kid(ikos.Actor):
        def receive(self, message: Any) -> Any:
            return f"kid got {message}"

    class Parent(ikos.Actor):
        def receive(self, message: Any) -> Any:
            kid = ikos.spawn(Kid, name="kid")
            return kid.ask(message, timeout=10)

    with ikos.local() as system:
        assert system.spawn(Parent).ask("milk", timeout=60) == "kid got milk"
        assert system.ref("kid").ask(1, timeout=10) == "kid got 1"


def test_local_system_with_a_tree(mark: str) -> None:
    class Adder(ikos.Actor):
        def __init__(self, amount: int) -> None:
            self.amount = amount

        def receive(self, message: Any) -> Any:
            return message + self.amount

    tree = ikos.Supervisor(
        "app", children=[ikos.Child("adder", Adder, args=(5,)), ikos.Child("doubler", Doubler)]
    )
    assert carried_tree(tree).children[0].actor.by_value  # type: ignore[union-attr]
    with ikos.local(tree=tree) as system:
        assert system.ref("adder").ask(1, timeout=10) == 6
        assert system.ref("doubler").ask(4, timeout=10) == 8


class Pid(ikos.Actor):
    def receive(self, message: Any) -> Any:
        return os.getpid()


def test_local_system_stops_after_an_exception_in_the_block(mark: str) -> None:
    with pytest.raises(ZeroDivisionError), ikos.local() as system:
        root, ikosd_pid = system.root, system.pid
        actor_pid = system.spawn(Pid).ask(None, timeout=10)
        1 / 0  # noqa: B018
    assert ikosd_pid is not None and not alive(ikosd_pid)
    assert not alive(actor_pid)
    assert not root.exists()


def test_killing_the_users_process_takes_the_local_system_down(mark: str, tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        PRELUDE
        + textwrap.dedent(
            """
            import json

            class Sleeper(ikos.Actor):
                def receive(self, message):
                    return os.getpid()

            with ikos.local() as system:
                ref = system.spawn(Sleeper)
                found = {"root": str(system.root), "ikosd": system.pid, "actor": ref.ask(0)}
                print(json.dumps(found), flush=True)
                signal.pause()
            """
        )
    )
    owner = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        line = read_line(owner.stdout, timeout=HANG * 4)  # type: ignore[arg-type]
        assert line, owner.stderr.read() if owner.stderr else ""
        found = json.loads(line)
        assert alive(found["ikosd"]) and alive(found["actor"])
    finally:
        owner.kill()
        owner.wait()
        for stream in (owner.stdout, owner.stderr):
            if stream is not None:
                stream.close()
    wait_for(lambda: not alive(found["actor"]), timeout=HANG * 2, message="the actor to go")
    wait_for(lambda: not alive(found["ikosd"]), timeout=HANG * 2, message="the ikosd to go")
    wait_for(
        lambda: not Path(found["root"]).exists(), timeout=HANG, message="the root to be removed"
    )
