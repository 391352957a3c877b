"""The OTP matrix: strategy x restart type x exit reason, with real processes.

Every case is a supervisor with the strategy under test and three sibling
actors (``a``, ``b``, ``c``; ``b`` has the restart type under test) in a real
``ikosd``. The test makes ``b`` exit for one of four reasons and then reads
what happened from the outside: which PIDs changed, and how many times each
actor started (every start appends ``"<name> <pid> ok|fail"`` to a start
log, so restarts are counted, not guessed). Nothing is mocked and nothing
waits on a fixed sleep. One ikosd runs the 12 cases of a strategy, each case
under its own supervisor (named ``RESTART-REASON``, its actors
``RESTART-REASON-a`` ...), so that the matrix does not spend its time
booting 48 ikosds.

Expected outcomes (OTP's ``supervisor`` semantics):

- ``b`` restarts iff it is ``permanent``, or ``transient`` with an abnormal
  exit (anything but ``self.stop()``).
- When it restarts, the strategy decides who restarts with it:
  ``one_for_one`` and ``simple_one_for_one`` only ``b``; ``one_for_all``
  ``a``, ``b`` and ``c``; ``rest_for_one`` ``b`` and ``c``. Every other
  sibling keeps its PID.
- When it does not, ``b`` ends ``stopped`` after a normal exit and
  ``failed`` after an abnormal one, and nobody else moves. Under
  ``simple_one_for_one`` a child that is not restarted is deleted from the
  supervisor, as OTP does.

The exit reasons: ``normal`` (``receive`` calls ``self.stop()``: status 0),
``receive`` (``receive`` raises: status 1), ``on_start`` (``on_start``
raises: status 2) and ``kill`` (SIGKILL).

``on_start`` is made to fail at ``b``'s first start (a marker file that the
first start consumes), so that this exit is the only one in the case. For the
static strategies that first start is at boot, where ikos deliberately
differs from OTP (see ``ikos/supervision/_runtime.py``): the failure does not
abort the supervisor but is handled as a crash, by ``b``'s restart type and
the strategy, exactly as the rules above say. For ``simple_one_for_one`` the
first start is the dynamic ``start_child``, where OTP's rule applies as is:
the start returns an error, the child is not added and nothing restarts,
whatever its restart type.

``simple_one_for_one`` children are added after boot as a user does, with
``ikos.start_child`` (the ``start_child`` control verb): three instances of
the template, ``...-w.1``, ``...-w.2`` (the target) and ``...-w.3``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Instance, start_ikosd, stop_and_check, wait_for

import ikos
from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one")
RESTARTS = ("permanent", "transient", "temporary")
REASONS = ("normal", "receive", "on_start", "kill")

PROBE = """
import os

import ikos


class Probe(ikos.Actor):
    def __init__(self, log, fail_dir):
        self.log, self.fail_dir = log, fail_dir

    def on_start(self):
        marker = os.path.join(self.fail_dir, "fail-" + self.name)
        failing = os.path.exists(marker)
        line = f"{self.name} {os.getpid()} {'fail' if failing else 'ok'}\\n"
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        if failing:
            os.unlink(marker)
            raise RuntimeError("on_start told to fail once")

    def receive(self, message):
        if message == "stop":
            self.stop()
            return "stopping"
        if message == "crash":
            raise RuntimeError("crash requested")
        return os.getpid()
"""

TREE = (
    PROBE
    + """

KW = {"log": LOG, "fail_dir": FAIL_DIR}


def case(restart, reason):
    # One supervisor per case, with the strategy under test; a, b, c (or the
    # simple_one_for_one template w) named after the case.
    prefix = f"{restart}-{reason}-"
    if STRATEGY == "simple_one_for_one":
        children = [ikos.Child(prefix + "w", Probe, restart=restart, kwargs=KW)]
    else:
        children = [
            ikos.Child(prefix + "a", Probe, kwargs=KW),
            ikos.Child(prefix + "b", Probe, restart=restart, kwargs=KW),
            ikos.Child(prefix + "c", Probe, kwargs=KW),
        ]
    return ikos.Supervisor(
        prefix[:-1], strategy=STRATEGY, max_restarts=50, within=60, children=children
    )


tree = ikos.Supervisor(
    "root",
    max_restarts=1000,
    within=60,
    children=[case(restart, reason) for restart in RESTARTS for reason in REASONS],
)
"""
)


def names_for(strategy: str, restart: str, reason: str) -> tuple[str, str, str]:
    """The three siblings of one case; the second is the target."""
    prefix = f"{restart}-{reason}-"
    if strategy == "simple_one_for_one":
        return (f"{prefix}w.1", f"{prefix}w.2", f"{prefix}w.3")
    return (f"{prefix}a", f"{prefix}b", f"{prefix}c")


def expected(strategy: str, restart: str, reason: str) -> tuple[set[int], str]:
    """Which siblings (0, 1, 2 = a, b, c) start again, and b's final state.

    The final state is ``running``, ``stopped``, ``failed`` or ``removed``
    (deleted from a simple_one_for_one supervisor).
    """
    abnormal = reason != "normal"
    if strategy == "simple_one_for_one" and reason == "on_start":
        return set(), "removed"  # OTP's start_child: an error, the child is not added
    if restart == "permanent" or (restart == "transient" and abnormal):
        group = {"one_for_all": {0, 1, 2}, "rest_for_one": {1, 2}}.get(strategy, {1})
        return group, "running"
    if strategy == "simple_one_for_one":
        return set(), "removed"
    return set(), "failed" if abnormal else "stopped"


def starts(log: Path) -> dict[str, list[tuple[int, str]]]:
    """The start log: for each actor, its (pid, ok|fail) starts in order."""
    out: dict[str, list[tuple[int, str]]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            name, pid, outcome = line.split()
            out.setdefault(name, []).append((int(pid), outcome))
    return out


def statuses(client: ControlClient) -> dict[str, dict[str, Any]]:
    """Every actor's status, by the control protocol.

    The matrix talks to ikosd as ikosctl does, but from this process: an
    ikosctl process per poll would double the matrix's time.
    """
    return {s["name"]: s for s in client.call("list") if s["kind"] == "actor"}


EXIT_OF = {
    "normal": {"code": 0, "signal": None},
    "receive": {"code": 1, "signal": None},
    "on_start": {"code": 2, "signal": None},
    "kill": {"code": None, "signal": signal.SIGKILL},
}


@dataclass
class Matrix:
    """One running ikosd with every case of one strategy, each under its own supervisor."""

    strategy: str
    inst: Instance
    client: ControlClient
    log: Path


@pytest.fixture(scope="module", params=STRATEGIES)
def matrix(request, tmp_path_factory) -> Iterator[Matrix]:
    """Start ikosd on the strategy's 12 cases; at the end, stop it and check it left nothing.

    One ikosd per strategy, not per case: booting ikosd dominates a case's
    time, and the cases cannot disturb each other (each has its own
    supervisor, which never reaches its intensity).
    """
    strategy = request.param
    base = tmp_path_factory.mktemp(strategy)
    log, fail_dir = base / "starts.log", base / "fail"
    fail_dir.mkdir()
    for restart in RESTARTS:
        (fail_dir / f"fail-{names_for(strategy, restart, 'on_start')[1]}").touch()
    tree = base / "matrix_tree.py"
    header = f"STRATEGY, RESTARTS, REASONS = {strategy!r}, {RESTARTS!r}, {REASONS!r}\n"
    header += f"LOG, FAIL_DIR = {str(log)!r}, {str(fail_dir)!r}\n"
    tree.write_text(header + TREE)
    inst = start_ikosd(base, ["--metrics", "off", "--tree", f"{tree}:tree"])
    try:
        inst.wait_ready()
        with ControlClient(InstancePaths.for_root(inst.root)) as client:
            yield Matrix(strategy, inst, client, log)
    finally:
        # SIGTERM, then no hang, exit 0 and nothing left behind, or the last case errs
        stop_and_check([inst])


@pytest.mark.parametrize("reason", REASONS)
@pytest.mark.parametrize("restart", RESTARTS)
def test_otp_matrix(matrix, restart, reason):
    strategy, inst, client, log = matrix.strategy, matrix.inst, matrix.client, matrix.log
    names = names_for(strategy, restart, reason)
    target = names[1]
    group, final = expected(strategy, restart, reason)
    if strategy == "simple_one_for_one":
        for name in names:
            if name == target and reason == "on_start":
                with pytest.raises(ikos.IkosError, match="on_start told to fail once"):
                    ikos.start_child(f"{restart}-{reason}", root=inst.root)
            else:
                assert ikos.start_child(f"{restart}-{reason}", root=inst.root) == name

    if reason == "on_start":
        # b's first start failed; a and c started once each.
        boot = wait_for(lambda: (s := starts(log)).keys() >= set(names) and s, message="starts")
        first = {n: boot[n][0][0] for n in names}
        assert starts(log)[target][0][1] == "fail"
    else:
        # Everyone is up; then b exits for the reason under test.
        first_status = wait_for(
            lambda: (
                (st := statuses(client))
                and all(st.get(n, {}).get("state") == "running" for n in names)
                and st
            ),
            message="a, b and c running",
        )
        first = {n: first_status[n]["pid"] for n in names}
        assert {n: starts(log)[n][0][0] for n in names} == first
        if reason == "normal":
            assert client.call("call", {"name": target, "data": "stop"}) == {"reply": "stopping"}
        elif reason == "receive":
            with pytest.raises(ikos.IkosError, match="crash requested"):
                client.call("call", {"name": target, "data": "crash"})
        else:
            os.kill(first[target], signal.SIGKILL)

    def settled() -> bool:
        log_now, st = starts(log), statuses(client)
        for i, name in enumerate(names):
            if i in group:
                runs = log_now.get(name, [])
                if not (
                    len(runs) == 2
                    and st.get(name, {}).get("state") == "running"
                    and st[name]["pid"] == runs[-1][0]
                ):
                    return False
        if final == "removed":
            return target not in st
        return st.get(target, {}).get("state") == final

    wait_for(settled, 30, message=f"{strategy}/{restart}/{reason} to settle as expected")
    # A command through the supervisor's queue: once it is answered, every exit
    # queued before it has been handled, so nothing else is about to restart.
    client.call("start", {"name": names[0]})

    log_now, st = starts(log), statuses(client)
    for i, name in enumerate(names):
        if i == 1 and final != "running":
            continue
        assert st[name]["state"] == "running", (name, st[name])
        if i in group:
            assert len(log_now[name]) == 2, (name, log_now)
            assert log_now[name][1][1] == "ok"
            assert st[name]["pid"] == log_now[name][1][0] != first[name]
            assert st[name]["restarts"] == 1
        else:
            assert log_now[name] == [(first[name], "ok")], (name, log_now)
            assert st[name]["pid"] == first[name]
            assert st[name]["restarts"] == 0
    if final == "removed":
        assert target not in st
        assert inst.ctl("status", target).returncode == 4
    else:
        b = st[target]
        assert b["state"] == final
        if final != "running":
            assert b["pid"] is None
            assert len(log_now[target]) == 1
        exit_info = b["last_exit"]
        assert {k: exit_info[k] for k in ("code", "signal")} == EXIT_OF[reason], exit_info


def test_the_expectation_table_is_otp():
    """Pin a few rows of ``expected`` against the OTP rules written out by hand."""
    assert expected("one_for_all", "permanent", "normal") == ({0, 1, 2}, "running")
    assert expected("rest_for_one", "transient", "kill") == ({1, 2}, "running")
    assert expected("rest_for_one", "transient", "normal") == (set(), "stopped")
    assert expected("one_for_one", "temporary", "receive") == (set(), "failed")
    assert expected("simple_one_for_one", "transient", "normal") == (set(), "removed")
    assert expected("simple_one_for_one", "permanent", "kill") == ({1}, "running")
    assert expected("simple_one_for_one", "permanent", "on_start") == (set(), "removed")


SUPERVISORS_TREE = (
    PROBE
    + """

KW = {"log": LOG, "fail_dir": FAIL_DIR}


def sub(restart):
    # A child supervisor of the restart type under test, giving up at its second restart.
    workers = [ikos.Child(f"{w}-{restart}", Probe, kwargs=KW) for w in ("x", "y")]
    return ikos.Supervisor(
        f"sub-{restart}", restart=restart, max_restarts=1, within=30, children=workers
    )


tree = ikos.Supervisor(
    "root",
    max_restarts=10,
    within=60,
    children=[*(sub(restart) for restart in RESTARTS), ikos.Child("z", Probe, kwargs=KW)],
)
"""
)


def test_a_child_supervisor_that_gives_up_exits_with_reason_shutdown(ikosd_factory, tmp_path):
    """OTP: a supervisor reaching its restart intensity exits with reason ``shutdown``.

    For its parent that is a normal exit: a ``transient`` or ``temporary``
    child supervisor stays down (``failed``, saying why), a ``permanent``
    one is restarted. One ikosd holds a child supervisor of each restart
    type (``sub-RESTART`` with workers ``x-RESTART``, ``y-RESTART``, at most
    1 restart in 30 s) and a worker ``z``; ``x`` is killed twice in each.
    """
    log, fail_dir = tmp_path / "starts.log", tmp_path / "fail"
    fail_dir.mkdir()
    header = f"RESTARTS = {RESTARTS!r}\nLOG, FAIL_DIR = {str(log)!r}, {str(fail_dir)!r}\n"
    inst = ikosd_factory(tree=header + SUPERVISORS_TREE, args=["--metrics", "off"])

    def start_pids(name: str, count: int) -> list[int]:
        return wait_for(
            lambda: len(p := [pid for pid, _ in starts(log).get(name, [])]) >= count and p,
            message=f"start #{count} of {name}",
        )

    with ControlClient(InstancePaths.for_root(inst.root)) as client:
        for restart in RESTARTS:
            x = f"x-{restart}"
            os.kill(start_pids(x, 1)[-1], signal.SIGKILL)  # sub restarts x
            os.kill(start_pids(x, 2)[-1], signal.SIGKILL)  # the second within 30 s: sub gives up
        for restart in RESTARTS:
            wanted = "running" if restart == "permanent" else "failed"
            wait_for(
                lambda r=restart, w=wanted: (
                    (s := client.call("status", {"names": [f"sub-{r}"]}))
                    and s[0]["state"] == w
                    and (w == "failed" or s[0]["restarts"] == 1)
                ),
                message=f"sub-{restart} to be {wanted}",
            )
        client.call("start", {"name": "z"})  # a barrier through root's queue
        st = {s["name"]: s for s in client.call("list")}
    counts = {name: len(runs) for name, runs in starts(log).items()}
    for restart in RESTARTS:
        sub = st[f"sub-{restart}"]
        assert sub["last_exit"]["reason"].startswith(
            f"reached max restart intensity (1 in 30 s) after 'x-{restart}' killed by SIGKILL"
        ), sub
        if restart == "permanent":  # restarted by root, with its workers
            assert (sub["state"], sub["restarts"]) == ("running", 1)
            assert (counts[f"x-{restart}"], counts[f"y-{restart}"]) == (3, 2)
        else:  # a normal exit for root: stays down
            assert (sub["state"], sub["restarts"]) == ("failed", 0)
            assert (counts[f"x-{restart}"], counts[f"y-{restart}"]) == (2, 1)
            assert st[f"x-{restart}"]["state"] == "failed"  # its own crash
            assert st[f"y-{restart}"]["state"] == "stopped"  # stopped by sub as it gave up
    assert counts["z"] == 1 and st["z"]["restarts"] == 0
    assert st["root"]["state"] == "running" and inst.proc.poll() is None
