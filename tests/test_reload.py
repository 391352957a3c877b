"""Reloading ikos.toml in a running ikosd: SIGHUP and ``ikosctl reload-config``.

ikosd runs ``-c ikos.toml`` with the example actors; the test rewrites the
file and asks for a reload, then checks what a user sees: added daemons
running, removed ones gone with their processes, changed ones on a new PID,
unchanged ones on their old PID, and a bad file refused (logged, and the
running tree left exactly as it was).
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from typing import Any

import pytest
from conftest import Instance, wait_for

HEAD = """
[ikosd]
metrics = false

[root]
max_restarts = 10
within = 5
"""


def actor(name: str, cls: str = "Echo", **keys: str) -> str:
    lines = [f"[actors.{name}]", f'class = "examples.actors:{cls}"']
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def config(*entries: str) -> str:
    return HEAD + "\n" + "\n".join(entries)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def pids(inst: Instance) -> dict[str, int | None]:
    return {s["name"]: s["pid"] for s in inst.status()}


def states(inst: Instance) -> list[tuple[str, str, int | None, int]]:
    return [(s["name"], s["state"], s["pid"], s["restarts"]) for s in inst.status()]


def rewrite(inst: Instance, text: str) -> None:
    (inst.root.parent / "ikos.toml").write_text(textwrap.dedent(text))


def reload_by_sighup(inst: Instance) -> dict[str, list[str]]:
    """Send SIGHUP and wait for the log line that reports the reload's result."""
    done = inst.log_text().count("configuration reloaded: ")
    os.kill(inst.pid, signal.SIGHUP)
    wait_for(
        lambda: inst.log_text().count("configuration reloaded: ") > done,
        message="the reload's log line",
    )
    last = inst.log_text().rsplit("configuration reloaded: ", 1)[1].splitlines()[0]
    return _without_warnings(json.loads(last))


def reload_by_ikosctl(inst: Instance) -> dict[str, list[str]]:
    res = inst.ctl("reload-config", "--json")
    assert res.returncode == 0, res.stderr
    return _without_warnings(json.loads(res.stdout))


def _without_warnings(result: dict[str, list[str]]) -> dict[str, list[str]]:
    """The diff of a reload; its ``warnings`` (the file's unknown keys) must be none here."""
    assert result.pop("warnings") == [], result
    return result


RELOADERS = {"sighup": reload_by_sighup, "ikosctl": reload_by_ikosctl}


@pytest.fixture(params=sorted(RELOADERS))
def reload(request: pytest.FixtureRequest) -> Any:
    return RELOADERS[request.param]


def test_added_removed_changed_and_unchanged(ikosd_factory: Any, reload: Any) -> None:
    inst = ikosd_factory(
        config=config(
            actor("keep"),
            actor("gone"),
            actor("changed", "Echo"),
            actor("counter", "Counter"),
        )
    )
    before = pids(inst)
    assert inst.ctl("call", "counter", "incr").stdout == "1\n"
    rewrite(
        inst,
        config(
            actor("keep"),
            actor("changed", "Crashy"),
            actor("counter", "Counter"),
            actor("fresh", "Counter"),
        ),
    )
    result = reload(inst)
    assert result == {"added": ["fresh"], "removed": ["gone"], "changed": ["changed"]}

    after = {s["name"]: s for s in inst.status()}
    assert list(after) == [
        "root",
        "ikos-system",
        "ikos-broker",
        "keep",
        "changed",
        "counter",
        "fresh",
    ]
    assert all(s["state"] == "running" for s in after.values() if s["name"] != "ikos-broker")
    # unchanged: same process, same state
    assert after["keep"]["pid"] == before["keep"]
    assert after["counter"]["pid"] == before["counter"]
    assert inst.ctl("call", "counter", "get").stdout == "1\n"
    # changed: a new process running the new class
    assert after["changed"]["pid"] != before["changed"]
    assert after["changed"]["target"] == "examples.actors:Crashy"
    assert not alive(before["changed"])  # type: ignore[arg-type]
    # removed: unknown now, and its process gone
    assert inst.ctl("status", "gone").returncode == 4
    assert not alive(before["gone"])  # type: ignore[arg-type]
    assert before["gone"] not in inst.leftovers()
    # added: running and answering
    assert inst.ctl("call", "fresh", "incr").stdout == "1\n"
    log = inst.log_text()
    assert "actor gone: stopping -> stopped" in log
    assert "actor fresh: starting -> running" in log


def test_a_reload_without_changes_touches_nothing(ikosd_factory: Any, reload: Any) -> None:
    inst = ikosd_factory(config=config(actor("echo"), actor("counter", "Counter")))
    before = states(inst)
    assert reload(inst) == {"added": [], "removed": [], "changed": []}
    assert states(inst) == before


BAD_CONFIGS = {
    "bad value": (
        config(actor("echo", restart='"forever"')),
        "[actors.echo] key 'restart': expected one of permanent, transient, temporary",
    ),
    "bad toml": (
        config(actor("echo")) + "\n[actors.oops\n",
        "expected valid TOML syntax",
    ),
    "unknown class": (
        config(actor("echo", "NoSuchActor")),
        "[actors.echo] key 'class'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_is_refused_by_sighup(ikosd_factory: Any, case: str) -> None:
    inst = ikosd_factory(config=config(actor("echo"), actor("counter", "Counter")))
    before = states(inst)
    text, expected = BAD_CONFIGS[case]
    rewrite(inst, text)
    os.kill(inst.pid, signal.SIGHUP)
    line = wait_for(
        lambda: next(
            (ln for ln in inst.log_text().splitlines() if "configuration reload refused" in ln),
            None,
        ),
        message="the refusal in the log",
    )
    assert " ERROR " in line
    assert "ikos.toml" in line and expected in line, line
    assert inst.proc.poll() is None
    assert states(inst) == before
    # The file's log has it too.
    assert expected in (inst.root / "var/log/ikos/ikosd.log").read_text()


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_is_refused_by_ikosctl(ikosd_factory: Any, case: str) -> None:
    inst = ikosd_factory(config=config(actor("echo"), actor("counter", "Counter")))
    before = states(inst)
    text, expected = BAD_CONFIGS[case]
    rewrite(inst, text)
    res = inst.ctl("reload-config")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ikosctl: "), res.stderr
    assert "ikos.toml" in lines[0] and expected in lines[0], lines[0]
    assert states(inst) == before
    # Fixing the file makes the next reload work.
    rewrite(inst, config(actor("echo"), actor("counter", "Counter"), actor("more")))
    assert reload_by_ikosctl(inst) == {"added": ["more"], "removed": [], "changed": []}


def nested(workers_strategy: str, w2_class: str, extra: str = "") -> str:
    return config(
        actor("echo"),
        textwrap.dedent(
            f"""
            [supervisors.workers]
            strategy = "{workers_strategy}"
            max_restarts = 10
            within = 5
            """
        ),
        actor("w1", supervisor='"workers"'),
        actor("w2", w2_class, supervisor='"workers"'),
        extra,
    )


def test_a_changed_child_of_a_nested_supervisor(ikosd_factory: Any, reload: Any) -> None:
    inst = ikosd_factory(config=nested("one_for_one", "Echo"))
    before = pids(inst)
    rewrite(inst, nested("one_for_one", "Counter", actor("w3", supervisor='"workers"')))
    assert reload(inst) == {"added": ["w3"], "removed": [], "changed": ["w2"]}
    after = {s["name"]: s for s in inst.status()}
    assert list(after) == [
        "root",
        "ikos-system",
        "ikos-broker",
        "echo",
        "workers",
        "w1",
        "w2",
        "w3",
    ]
    assert after["w3"]["supervisor"] == "workers" and after["w3"]["state"] == "running"
    assert after["w2"]["pid"] != before["w2"] and after["w2"]["state"] == "running"
    assert after["w1"]["pid"] == before["w1"]
    assert after["echo"]["pid"] == before["echo"]


def test_a_changed_nested_supervisor_restarts_its_subtree(ikosd_factory: Any, reload: Any) -> None:
    inst = ikosd_factory(config=nested("one_for_one", "Echo"))
    before = pids(inst)
    rewrite(inst, nested("rest_for_one", "Echo"))
    assert reload(inst) == {"added": [], "removed": [], "changed": ["workers"]}
    tree = json.loads(inst.ctl("tree", "--json").stdout)
    workers = tree["children"][2]  # after ikos-system (the IPC broker) and echo
    assert workers["name"] == "workers" and workers["strategy"] == "rest_for_one"
    after = pids(inst)
    assert after["w1"] != before["w1"] and after["w2"] != before["w2"]
    assert after["echo"] == before["echo"]
    assert not alive(before["w1"]) and not alive(before["w2"])  # type: ignore[arg-type]
    # The new strategy is in force: killing w1 restarts w2 with it.
    inst.ctl("kill", "-s", "KILL", "w1", check=True)
    inst.wait_running_new_pid("w1", after["w1"])
    inst.wait_running_new_pid("w2", after["w2"])


def test_a_dependency_cycle_is_refused_with_its_path(ikosd_factory: Any) -> None:
    inst = ikosd_factory(config=config(actor("a"), actor("b"), actor("c")))
    before = states(inst)
    rewrite(
        inst,
        config(
            actor("a", requires='["b"]'),
            actor("b", requires='["c"]'),
            actor("c", requires='["a"]'),
        ),
    )
    res = inst.ctl("reload-config")
    assert res.returncode == 1
    [line] = res.stderr.splitlines()
    cycle = line.split("cycle", 1)[1]
    assert any(
        path in cycle for path in ("a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c")
    ), line
    assert states(inst) == before

    os.kill(inst.pid, signal.SIGHUP)
    refused = wait_for(
        lambda: next(
            (ln for ln in inst.log_text().splitlines() if "configuration reload refused" in ln),
            None,
        ),
        message="the refusal in the log",
    )
    assert "cycle" in refused and " -> " in refused, refused
    assert states(inst) == before


def test_reload_with_a_python_tree_keeps_the_python_part(ikosd_factory: Any) -> None:
    tree = """
    import ikos
    from examples.actors import Echo
    tree = ikos.Supervisor("main", max_restarts=10, children=[ikos.Child("py", Echo)])
    """
    inst = ikosd_factory(tree=tree, config="[ikosd]\nmetrics = false\n")
    before = pids(inst)
    rewrite(inst, "[ikosd]\nmetrics = false\n" + actor("from_file", "Counter"))
    assert reload_by_ikosctl(inst) == {"added": ["from_file"], "removed": [], "changed": []}
    after = {s["name"]: s for s in inst.status()}
    assert after["py"]["pid"] == before["py"]
    assert after["from_file"]["supervisor"] == "main"
    assert after["from_file"]["state"] == "running"
