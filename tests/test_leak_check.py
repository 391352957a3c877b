"""The teardown of ``ikosd_factory`` tells the truth (issue 14, item 9).

A process left behind, an exit status nobody declared and a shutdown that
hangs each fail the test that caused them (an error at teardown that names
the process, the status or the log); a crash adopted by the next ikosd, a
declared status and declared leftovers do not. The fixture is run as the
suite runs it: the real conftest in a separate pytest (``pytester``) on
real ikosd instances, one file of cases, so that its outcome can be read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CASES = '''
import os
import signal

import conftest

TREE = "import ikos\\ntree = ikos.Supervisor('root')\\n"
ACTOR = """
import ikos
from ikos import Actor

class Echo(Actor):
    def receive(self, message):
        return message

tree = ikos.Supervisor("root", children=[ikos.Child("echo", Echo)])
"""
NO_METRICS = ["--metrics", "off"]


def leave_a_sleep(inst):
    """A process carrying the instance's mark that nothing will stop."""
    os.posix_spawnp("sleep", ["sleep", "1000"], inst.env)


# The failing cases wait less for what they leave (monkeypatch first: it is undone
# after the factory's teardown).


def test_leaked(monkeypatch, ikosd_factory):
    monkeypatch.setattr(conftest, "LEFTOVER_GRACE", 1.0)
    leave_a_sleep(ikosd_factory(tree=TREE, args=NO_METRICS))


def test_killed(monkeypatch, ikosd_factory):
    monkeypatch.setattr(conftest, "LEFTOVER_GRACE", 1.0)
    inst = ikosd_factory(tree=TREE, args=NO_METRICS)
    inst.proc.kill()
    inst.proc.wait()


def test_hung(monkeypatch, ikosd_factory):
    monkeypatch.setattr(conftest, "LEFTOVER_GRACE", 1.0)
    monkeypatch.setattr(conftest, "SHUTDOWN_TIMEOUT", 1.0)
    inst = ikosd_factory(tree=TREE, args=NO_METRICS)
    os.kill(inst.pid, signal.SIGSTOP)  # SIGTERM will wait


def test_crashed_then_adopted(ikosd_factory):
    inst = ikosd_factory(tree=ACTOR, args=NO_METRICS)
    echo = inst.pid_of("echo")
    inst.crash()
    again = ikosd_factory(tree=ACTOR, args=NO_METRICS)  # the same root
    assert again.pid_of("echo") == echo


def test_declared_status(ikosd_factory):
    config = "[ikosd]\\nmetrics = false\\n[executables.x]\\n"  # no executable: exit 2
    inst = ikosd_factory(config=config, wait_ready=False, expect_exit=2)
    assert inst.proc.wait(timeout=60) == 2


def test_declared_leftovers(ikosd_factory):
    inst = ikosd_factory(tree=TREE, args=NO_METRICS)
    leave_a_sleep(inst)
    inst.leave_behind("the test's own sleep, on purpose")
'''


def test_the_teardown_fails_on_leaks_bad_statuses_and_hangs(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    outcomes = result.parseoutcomes()
    assert (outcomes.get("passed"), outcomes.get("errors")) == (6, 3), result.stdout.str()
    errors = {line.split(" - ")[0] for line in result.stdout.lines if line.startswith("ERROR ")}
    assert errors == {f"ERROR test_cases.py::test_{n}" for n in ("leaked", "killed", "hung")}
    result.stdout.fnmatch_lines(["*: 1 processes left behind:", "  * (sleep 1000)"])
    result.stdout.fnmatch_lines(["*exited with status -9, expected [[]0[]]; its log ends:*"])
    result.stdout.fnmatch_lines(["*hung: still running 1 s after SIGTERM; its log ends:*"])
