"""A first end-to-end check: a tree boots, answers, restarts a killed actor, stops clean."""

from __future__ import annotations

import os
import signal

from conftest import wait_for

import ikos

TREE = """
import os
import ikos

class Echo(ikos.Actor):
    def receive(self, message):
        return (message, os.getpid())

tree = ikos.Supervisor("root", children=[ikos.Child("echo", Echo)])
"""


def test_boot_ask_restart_and_clean_shutdown(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    ref = ikos.ActorRef("echo", root=inst.root)
    msg, pid = ref.ask("hello", timeout=10)
    assert msg == "hello" and pid == inst.pid_of("echo")
    os.kill(pid, signal.SIGKILL)
    new = inst.wait_running_new_pid("echo", pid)
    assert wait_for(lambda: ref.ask("again", timeout=10)[1] == new)
    assert inst.status("echo")["restarts"] == 1
    assert inst.terminate() == 0
    assert inst.leftovers() == []


DEPS_TREE = """
import ikos

class Slow(ikos.Actor):
    def receive(self, message):
        return message

tree = ikos.Supervisor("root", children=[
    ikos.Child("api", Slow, requires=["db"]),
    ikos.Child("db", Slow),
    ikos.Child("cache", Slow, after=["db"]),
])
"""


def test_tree_shows_dependency_order(ikosd_factory):
    inst = ikosd_factory(tree=DEPS_TREE, args=["--metrics", "off"])
    out = inst.ctl("tree", "--deps", check=True).stdout
    lines = [line for line in out.splitlines() if "[actor]" in line]
    # children are listed in start order: db before what requires or follows it
    assert [line.split()[1] for line in lines] == ["db", "api", "cache"]
    assert "(requires db)" in lines[1] and "(after db)" in lines[2]
    status = inst.status("api")
    assert status["requires"] == ["db"] and status["after"] == []
