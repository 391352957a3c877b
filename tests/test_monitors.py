"""Monitors end to end: ``self.monitor(name)`` and the ``Down`` each stop delivers.

Every test runs a real ikosd with a *watcher* actor that appends every
message it gets (and every start of an incarnation) as a JSON line to a
record file, so that what it received survives its restarts and ikosd's
shutdown. The watched daemons are a plain actor and a real executable
(``/bin/sleep``). Negative facts ("no Down came") are checked against a
later Down that the same watcher must get after it: Downs to one watcher
keep their order, so once the later one is in, the earlier one would be too.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import Instance, wait_for

import ikos
from ikos.actors import _monitor
from ikos.actors._monitor import Addressed
from ikos.manager._monitor_service import read_saved, stop_reason, write_saved
from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths
from ikos.supervision._runtime import ExitReason

ACTORS = """
import json
import os
import time

import ikos


class Watcher(ikos.Actor):
    \"\"\"Monitors ``targets`` from on_start; records starts and messages in ``record``.\"\"\"

    def __init__(self, record, targets=()):
        self.record = record
        self.targets = targets

    def on_start(self):
        for target in self.targets:
            self.monitor(target)
        self.write({"event": "started"})

    def write(self, entry):
        with open(self.record, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), **entry}) + "\\n")

    def receive(self, message):
        if isinstance(message, ikos.Down):
            self.write({"event": "down", "name": message.name, "reason": message.reason,
                        "detail": message.detail, "of": message.pid})
            return None
        verb, name = message
        if verb == "block":  # until the file ``name`` exists
            while not os.path.exists(name):
                time.sleep(0.01)
            return "ok"
        try:
            getattr(self, verb)(name)
        except ikos.IkosError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok"


class Target(ikos.Actor):
    def receive(self, message):
        if message == "crash":
            raise ValueError("asked to crash")
        if message == "stop":
            self.stop()
        return os.getpid()
"""


def tree(record: Path, children: str, **root: Any) -> str:
    options = {"max_restarts": 100, "within": 1, **root}
    fields = "".join(f", {k}={v!r}" for k, v in options.items())
    body = textwrap.dedent(children).strip()
    root_spec = f'ikos.Supervisor("root"{fields}, children=[{body}])'
    return f"{ACTORS}\nRECORD = {str(record)!r}\ntree = {root_spec}\n"


def entries(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


def downs(record: Path, name: str | None = None) -> list[dict[str, Any]]:
    return [
        e for e in entries(record) if e["event"] == "down" and (name is None or e["name"] == name)
    ]


def wait_downs(record: Path, count: int, name: str | None = None) -> list[dict[str, Any]]:
    """The Downs recorded (of ``name``) once there are ``count`` of them."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (got := downs(record, name)) and len(got) >= count and got,
        message=f"{count} Down(s){f' of {name}' if name else ''} in {record}",
    )


def started(record: Path) -> list[int]:
    return [e["pid"] for e in entries(record) if e["event"] == "started"]


def ask(inst: Instance, name: str, message: Any) -> Any:
    return ikos.ActorRef(name, root=inst.root).ask(message, timeout=30)


def test_the_reason_words_of_a_stop() -> None:
    assert stop_reason(ExitReason("killed by SIGKILL", signal=9), None) == (
        "killed",
        "killed by SIGKILL",
    )
    assert stop_reason(ExitReason("exited normally", code=0), None)[0] == "normal"
    assert stop_reason(ExitReason("receive raised ValueError: x", code=1), None) == (
        "crashed",
        "receive raised ValueError: x",
    )
    term = ExitReason("exited normally", code=0, shutdown=True)
    assert stop_reason(term, "stopped by request")[0] == "stopped"
    assert stop_reason(term, "restart requested")[0] == "restarted"
    assert stop_reason(term, "ikosd shutting down") == (
        "shutdown",
        "ikosd shutting down: exited normally",
    )
    assert stop_reason(term, "restarting with db (one_for_all)")[0] == "shutdown"
    killed_late = ExitReason("killed by SIGKILL", signal=9, shutdown=True)
    assert stop_reason(killed_late, "stopped by request")[0] == "stopped"
    failed = ExitReason("health check failed: refused", code=0, failure=True)
    assert stop_reason(failed, "health check failed: refused")[0] == "failed"
    assert stop_reason(None, "removed") == ("shutdown", "removed")
    assert set(ikos.Down.__dataclass_fields__) >= {"name", "reason", "detail", "pid"}


def test_down_on_every_stop_of_an_actor_and_an_executable(ikosd_factory, tmp_path):
    """SIGKILL, a crash, self.stop(), ikosctl stop, an executable killed: one Down each,
    in order, the monitor still armed after each restart of the watched daemon."""
    record = tmp_path / "record.jsonl"
    inst = ikosd_factory(
        tree=tree(
            record,
            """
            ikos.Child("target", Target),
            ikos.Exec("sleeper", "/bin/sleep", args=["1000"]),
            ikos.Child("watcher", Watcher, args=(RECORD, ["target", "sleeper"]),
                       requires=["target", "sleeper"]),
            """,
        )
    )
    wait_for(lambda: started(record), message="the watcher's on_start")

    first = inst.pid_of("target")
    os.kill(first, signal.SIGKILL)
    (down,) = wait_downs(record, 1)
    assert down == {
        **down,
        "name": "target",
        "reason": "killed",
        "detail": "killed by SIGKILL",
        "of": first,
    }

    second = inst.wait_running_new_pid("target", first)
    with pytest.raises(ikos.ActorCrashed):
        ask(inst, "target", "crash")
    down = wait_downs(record, 2)[1]
    assert (down["reason"], down["of"]) == ("crashed", second)
    assert "ValueError: asked to crash" in down["detail"]

    third = inst.wait_running_new_pid("target", second)
    assert ask(inst, "target", "stop") == third
    down = wait_downs(record, 3)[2]
    assert (down["reason"], down["of"]) == ("normal", third)

    fourth = inst.wait_running_new_pid("target", third)
    inst.ctl("stop", "target", check=True)
    down = wait_downs(record, 4)[3]
    assert (down["reason"], down["of"]) == ("stopped", fourth)
    assert down["detail"].startswith("stopped by request")

    sleeper = inst.pid_of("sleeper")
    inst.ctl("kill", "-s", "KILL", "sleeper", check=True)
    down = wait_downs(record, 5)[4]
    assert (down["name"], down["reason"], down["of"]) == ("sleeper", "killed", sleeper)

    assert [d["name"] for d in downs(record)] == ["target"] * 4 + ["sleeper"]
    assert len(set(started(record))) == 1  # one watcher incarnation got them all


def test_noproc_demonitor_and_bad_names(ikosd_factory, tmp_path):
    record = tmp_path / "record.jsonl"
    inst = ikosd_factory(
        tree=tree(
            record,
            """
            ikos.Child("target", Target),
            ikos.Child("other", Target),
            ikos.Child("watcher", Watcher, args=(RECORD,)),
            """,
        )
    )
    inst.ctl("stop", "other", check=True)
    assert ask(inst, "watcher", ("monitor", "other")) == "ok"
    (down,) = wait_downs(record, 1)
    assert (down["name"], down["reason"], down["of"]) == ("other", "noproc", None)
    assert "stopped" in down["detail"]

    # demonitor: the next stop of target brings nothing, while other's (monitored
    # after it) does; Downs to one watcher keep their order, so target's would be first
    assert ask(inst, "watcher", ("monitor", "target")) == "ok"
    assert inst.status("watcher")["monitors"] == ["other", "target"]
    assert ask(inst, "watcher", ("demonitor", "target")) == "ok"
    assert inst.status("watcher")["monitors"] == ["other"]
    inst.ctl("stop", "target", check=True)
    inst.ctl("start", "other", check=True)
    inst.ctl("stop", "other", check=True)
    wait_downs(record, 2)
    assert [(d["name"], d["reason"]) for d in downs(record)] == [
        ("other", "noproc"),
        ("other", "stopped"),
    ]

    answer = ask(inst, "watcher", ("monitor", "nosuch"))
    assert answer.startswith("NoSuchDaemon") and "nosuch" in answer
    assert "cannot monitor itself" in ask(inst, "watcher", ("monitor", "watcher"))
    assert "supervisor" in ask(inst, "watcher", ("monitor", "root"))
    assert "non-empty string" in ask(inst, "watcher", ("monitor", ""))
    assert inst.state("watcher") == "running"


def test_a_down_unpickles_once_and_only_in_the_process_it_is_addressed_to(monkeypatch):
    monkeypatch.setattr(_monitor, "_last_taken", 0)  # this process's sequence
    down = ikos.Down("db", "killed", "killed by SIGKILL", 1234)
    assert pickle.loads(pickle.dumps(Addressed(down, os.getpid(), 1))) == down
    with pytest.raises(_monitor.DuplicateDown, match="number 1 was received already"):
        pickle.loads(pickle.dumps(Addressed(down, os.getpid(), 1)))
    assert pickle.loads(pickle.dumps(Addressed(down, os.getpid(), 2))) == down
    with pytest.raises(_monitor.StaleDown, match="addressed to pid 1, an earlier incarnation"):
        pickle.loads(pickle.dumps(Addressed(down, 1, 3)))
    assert pickle.loads(pickle.dumps(down)) == down  # received, it travels on as any value


def test_only_the_actor_itself_sets_its_monitors_and_gets_its_downs(ikosd_factory, tmp_path):
    record = tmp_path / "record.jsonl"
    inst = ikosd_factory(
        tree=tree(
            record, 'ikos.Child("target", Target), ikos.Child("watcher", Watcher, args=(RECORD,))'
        )
    )
    wait_for(lambda: started(record), message="the watcher's on_start")
    pid = inst.pid_of("watcher")
    down = ikos.Down("target", "killed", "killed by SIGKILL", 1)
    # addressed to an earlier incarnation, or a copy of one it had: refused before
    # receive, the actor unharmed
    with pytest.raises(ikos.ActorError, match="StaleDown"):
        ask(inst, "watcher", Addressed(down, pid + 100000, 1))
    ask(inst, "watcher", Addressed(down, pid, 1))
    with pytest.raises(ikos.ActorError, match="DuplicateDown"):
        ask(inst, "watcher", Addressed(down, pid, 1))
    assert [(d["pid"], d["detail"]) for d in downs(record)] == [(pid, "killed by SIGKILL")]
    assert inst.pid_of("watcher") == pid
    with ControlClient(InstancePaths.for_root(inst.root), timeout=30) as client:
        with pytest.raises(ikos.PermissionDenied, match="is not actor 'watcher'"):
            client.call("monitor", {"name": "target", "watcher": "watcher"})
        with pytest.raises(ikos.ManagerError, match="no actor of the tree"):
            client.call("monitor", {"name": "target", "watcher": "target-nope"})


def test_a_restarted_watcher_has_lost_its_monitors_and_the_watched_restarting_keeps_them(
    ikosd_factory, tmp_path
):
    record = tmp_path / "record.jsonl"
    inst = ikosd_factory(
        tree=tree(
            record,
            """
            ikos.Child("target", Target),
            ikos.Child("probe", Target),
            ikos.Child("watcher", Watcher, args=(RECORD,)),
            """,
        )
    )
    wait_for(lambda: started(record), message="the watcher's on_start")
    assert ask(inst, "watcher", ("monitor", "target")) == "ok"
    old = inst.pid_of("watcher")
    os.kill(old, signal.SIGKILL)
    new = inst.wait_running_new_pid("watcher", old)
    wait_for(lambda: new in started(record), message="the new watcher's on_start")

    # target stops before the new incarnation says anything: nothing for it; then it
    # monitors probe, whose Down comes well after target's would have
    inst.ctl("stop", "target", check=True)
    assert ask(inst, "watcher", ("monitor", "probe")) == "ok"
    inst.ctl("stop", "probe", check=True)
    (down,) = wait_downs(record, 1)
    assert (down["name"], down["pid"]) == ("probe", new)

    # across restarts of the watched: probe restarted, stopped twice more, one Down each
    inst.ctl("start", "probe", check=True)
    for count in (2, 3):
        inst.ctl("restart", "probe", check=True)
        got = wait_downs(record, count)
        assert (got[-1]["name"], got[-1]["reason"]) == ("probe", "restarted")
    assert all(d["name"] == "probe" for d in downs(record))


def test_down_at_shutdown_reaches_a_watcher_stopped_after_the_watched(ikosd_factory, tmp_path):
    """At shutdown daemons stop in reverse start order: the watcher (started first)
    stops after the target and the executable, and still handles both Downs."""
    record = tmp_path / "record.jsonl"
    inst = ikosd_factory(
        tree=tree(
            record,
            """
            ikos.Child("watcher", Watcher, args=(RECORD,)),
            ikos.Child("target", Target, requires=["watcher"]),
            ikos.Exec("sleeper", "/bin/sleep", args=["1000"], requires=["watcher"]),
            """,
        )
    )
    assert ask(inst, "watcher", ("monitor", "target")) == "ok"
    assert ask(inst, "watcher", ("monitor", "sleeper")) == "ok"
    assert inst.terminate() == 0
    got = {d["name"]: d for d in downs(record)}
    assert sorted(got) == ["sleeper", "target"]
    assert got["target"]["reason"] == "shutdown"
    assert got["target"]["detail"].startswith("ikosd shutting down: ")
    assert got["sleeper"]["reason"] == "shutdown"
    assert len(downs(record)) == 2
    # every watcher stopped: nothing is left for a next ikosd to adopt
    saved = InstancePaths.for_root(inst.root).state_dir / "monitors.json"
    assert json.loads(saved.read_text()) == {}


def test_a_one_for_all_restart_lets_the_watcher_handle_the_down_before_it_stops(
    ikosd_factory, tmp_path
):
    """The target is killed; one_for_all stops the watcher (its sibling) right away:
    the old watcher still handles the Down, the new one starts with its own noproc."""
    record = tmp_path / "record.jsonl"
    inst = ikosd_factory(
        tree=tree(
            record,
            """
            ikos.Child("watcher", Watcher, args=(RECORD, ["target"])),
            ikos.Child("target", Target, after=["watcher"]),
            """,
            strategy="one_for_all",
        )
    )
    (down,) = wait_downs(record, 1)  # the watcher started first: target was not running
    old = down["pid"]
    assert (down["name"], down["reason"]) == ("target", "noproc")
    target = inst.wait_state("target", "running")["pid"]
    os.kill(target, signal.SIGKILL)
    new = inst.wait_running_new_pid("watcher", old)
    got = wait_downs(record, 3)
    assert [(d["pid"], d["reason"]) for d in got] == [
        (old, "noproc"),
        (old, "killed"),
        (new, "noproc"),
    ]
    assert got[1]["of"] == target


def test_monitors_survive_a_crash_of_ikosd(ikosd_factory, tmp_path):
    """kill -9 of ikosd: the next one adopts the watcher and its monitors with it."""
    record = tmp_path / "record.jsonl"
    source = tree(
        record,
        """
        ikos.Child("target", Target),
        ikos.Child("watcher", Watcher, args=(RECORD, ["target"])),
        """,
    )
    inst = ikosd_factory(tree=source)
    wait_for(lambda: started(record), message="the watcher's on_start")
    watcher = inst.pid_of("watcher")
    inst.ctl("restart", "target", check=True)  # a Down before the crash, too
    wait_downs(record, 1)
    inst.crash()
    again = ikosd_factory(tree=source)
    assert again.pid_of("watcher") == watcher  # adopted, not restarted
    assert again.status("watcher")["monitors"] == ["target"]
    again.ctl("stop", "target", check=True)
    got = wait_downs(record, 2)
    assert [(d["pid"], d["reason"]) for d in got] == [(watcher, "restarted"), (watcher, "stopped")]
    assert started(record) == [watcher]


def test_a_damaged_saved_file_adopts_what_it_can(tmp_path):
    path = tmp_path / "monitors.json"
    assert read_saved(path) == {}
    path.write_text("{not json")
    assert read_saved(path) == {}
    path.write_text(
        json.dumps(
            {
                "good": {"pid": 10, "start": 99, "targets": ["a", "b"]},
                "no-start": {"pid": 11, "targets": ["a"]},
                "bad-targets": {"pid": 12, "start": 1, "targets": [1]},
                "not-a-dict": [],
            }
        )
    )
    assert read_saved(path) == {"good": (10, 99, ["a", "b"])}
    write_saved(path, {"w": {"pid": 1, "start": 2, "targets": ["t"]}})
    assert read_saved(path) == {"w": (1, 2, ["t"])}
    assert [p.name for p in tmp_path.iterdir()] == ["monitors.json"]


def test_a_slow_watcher_delays_only_its_own_downs_and_gets_them_all_in_order(
    ikosd_factory, tmp_path
):
    """One watcher is stuck in receive: the other gets its Downs meanwhile; the stuck
    one's deliveries time out and are tried again, and each arrives once, in order."""
    fast, slow, gate = tmp_path / "fast.jsonl", tmp_path / "slow.jsonl", tmp_path / "gate"
    inst = ikosd_factory(
        tree=tree(
            fast,
            f"""
            ikos.Child("target", Target),
            ikos.Child("fast", Watcher, args=({str(fast)!r}, ["target"]), requires=["target"]),
            ikos.Child("slow", Watcher, args=({str(slow)!r}, ["target"]), requires=["target"]),
            """,
        )
    )
    ikos.ActorRef("slow", root=inst.root).tell(("block", str(gate)))
    pids = []
    for count in (1, 2, 3):
        pid = inst.wait_running_new_pid("target", pids[-1] if pids else None)
        os.kill(pid, signal.SIGKILL)
        pids.append(pid)
        wait_downs(fast, count)
    assert downs(slow) == []
    wait_for(lambda: "slow does not take its Down(target)" in inst.log_text(), timeout=60)
    gate.touch()
    got = wait_downs(slow, 3)
    assert [(d["reason"], d["of"]) for d in got] == [("killed", pid) for pid in pids]
    assert [d["of"] for d in downs(fast)] == pids
