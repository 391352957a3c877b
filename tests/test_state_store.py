"""The stores that must survive a crash of ikosd, and the recovery plan made from them.

Unit tests, with real SQLite files and real processes where a record must
name a living one: a full database (SQLite's page limit stands in for a full
disk), damaged and truncated files, and the decisions of
:func:`~ikos.manager._recovery.plan_recovery`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import alive
from hypothesis import given
from hypothesis import strategies as st

from ikos.manager._daemon_service import DaemonStore
from ikos.manager._recovery import Marked, Stray, kill_strays, plan_recovery
from ikos.manager._state import RunningRecord, StateStore
from ikos.platform._database import DatabaseUnavailable, open_database
from ikos.platform._process import ProcInfo, boot_id, proc_info, process_stamp
from ikos.supervision._backoff import BackoffState, backoff_delay
from ikos.supervision._spec import Backoff


def record(
    name: str,
    pid: int,
    phase: str = "running",
    kind: str = "actor",
    stamp: tuple[str, int] | None = None,
) -> RunningRecord:
    boot, ticks = stamp or process_stamp(pid) or (boot_id(), -1)
    return RunningRecord(name, kind, pid, 0.0, pid, 0, time.time(), phase, boot, ticks)


@pytest.fixture
def clock_stepped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock as every reader sees it after a step of 14 s (a CI machine saw one).

    The kernel computes ``/proc/stat``'s boot time from the wall clock, so a
    step moves it, and with it every start time psutil gives (the start in
    ticks since boot, plus that boot time); ``time.time()`` moves as well.
    """
    import psutil._pslinux

    boot, now = psutil._pslinux.boot_time, time.time
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot() + 14.0)
    monkeypatch.setattr(time, "time", lambda: now() + 14.0)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started: killed and reaped after it."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def sleeper(children: list[subprocess.Popen[bytes]]) -> int:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    children.append(proc)
    return proc.pid


# -- StateStore ---------------------------------------------------------------------------


def test_rows_are_written_and_read_back(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    pid = sleeper(children)
    store = StateStore(tmp_path / "state.db")
    assert store.starting("a", "actor", pid, pid, 2)  # written at once
    store.running("a", "actor", pid, pid, 2, 123.0)
    assert store.flush()
    store.close()
    again = StateStore(tmp_path / "state.db").load()
    assert again["a"].phase == "running" and again["a"].pid == pid and again["a"].restarts == 2
    assert again["a"].still_running()


def test_a_step_of_the_wall_clock_leaves_a_recorded_process_running(
    tmp_path: Path, children: list[subprocess.Popen[bytes]], request: pytest.FixtureRequest
) -> None:
    """The CI failure of stop 19: a 14 s step made a live daemon look dead.

    An ikosd restarted after such a step would not have adopted its own
    daemons: the record is now the boot and the start in ticks since it.
    """
    pid = sleeper(children)
    store = StateStore(tmp_path / "state.db")
    store.starting("a", "exec", pid, pid, 0)
    store.running("a", "exec", pid, pid, 0, 1.0)
    assert store.flush()
    store.close()
    created = psutil.Process(pid).create_time()
    request.getfixturevalue("clock_stepped")
    assert abs(psutil.Process(pid).create_time() - created - 14.0) < 0.01  # the step is seen
    again = StateStore(tmp_path / "state.db").load()["a"]
    assert again.still_running()
    assert again.stamp == process_stamp(pid)
    plan = plan_recovery({"a": again}, {"a"}, [])
    assert list(plan.adoptable) == ["a"] and not plan.ended


def test_a_record_of_another_boot_or_a_reused_pid_is_not_running(
    children: list[subprocess.Popen[bytes]],
) -> None:
    pid = sleeper(children)
    mine = record("a", pid)
    assert mine.still_running()
    assert not record("a", pid, stamp=("another-boot", mine.start_ticks)).still_running()
    assert not record("a", pid, stamp=(mine.boot_id, mine.start_ticks - 1)).still_running()
    children[-1].kill()
    children[-1].wait(timeout=10)
    assert not mine.still_running()


def test_a_full_database_keeps_rows_pending_and_retries_until_it_works(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """Issue 7.3: a failed commit is neither lost nor silent; it is retried until it works."""

    async def scenario() -> None:
        store = StateStore(tmp_path / "state.db")
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
        pid = sleeper(children)
        for i in range(500):  # more than the pages left can hold
            store.starting(f"d{i}", "exec", pid, pid, 0)
        await asyncio.sleep(0.05)
        health = store.health()
        assert not health["ok"] and health["pending"] > 0 and health["failures"] >= 1
        assert "full" in str(health["error"])
        assert store.unsaved() and store.unsaved() <= {f"d{i}" for i in range(500)}
        store.db.execute("PRAGMA max_page_count = 1000000")  # space returns
        deadline = time.monotonic() + 10
        while store.unsaved() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert store.health()["ok"] and not store.unsaved()
        store.close()
        assert len(StateStore(tmp_path / "state.db").load()) == 500

    asyncio.run(scenario())


def test_a_row_of_an_ikos_before_stamps_is_checked_by_its_start_time(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    pid = sleeper(children)
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(
        "CREATE TABLE running (name TEXT PRIMARY KEY, kind TEXT NOT NULL, pid INTEGER NOT NULL,"
        " create_time REAL NOT NULL, sid INTEGER NOT NULL, restarts INTEGER NOT NULL,"
        " started_at REAL NOT NULL, phase TEXT NOT NULL DEFAULT 'running')"
    )
    created = psutil.Process(pid).create_time()
    rows = [("live", pid, created), ("reused", pid, created - 100), ("gone", 2**22 - 7, 1.0)]
    for name, row_pid, start in rows:
        db.execute(
            "INSERT INTO running VALUES (?, 'exec', ?, ?, ?, 0, 0, 'running')",
            (name, row_pid, start, row_pid),
        )
    db.commit()
    db.close()
    store = StateStore(tmp_path / "state.db")
    loaded = store.load()
    assert {n: r.still_running() for n, r in loaded.items()} == {
        "live": True,
        "reused": False,
        "gone": False,
    }
    assert loaded["live"].boot_id == ""
    store.running("live", "exec", pid, pid, 0, 1.0)  # rewritten by this ikos: stamped
    assert store.flush()
    store.close()
    assert StateStore(tmp_path / "state.db").load()["live"].stamp == process_stamp(pid)


def test_a_state_db_of_an_older_ikos_gains_the_phase(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(
        "CREATE TABLE running (name TEXT PRIMARY KEY, kind TEXT NOT NULL, pid INTEGER NOT NULL,"
        " create_time REAL NOT NULL, sid INTEGER NOT NULL, restarts INTEGER NOT NULL,"
        " started_at REAL NOT NULL)"
    )
    db.execute("INSERT INTO running VALUES ('old', 'actor', 1, 0, 1, 0, 0)")
    db.commit()
    db.close()
    assert StateStore(tmp_path / "state.db").load()["old"].phase == "running"


# -- open_database ------------------------------------------------------------------------


def test_a_damaged_database_is_moved_aside_and_said(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    path.write_bytes(b"not sqlite " * 500)
    db, problem = open_database(path, "CREATE TABLE IF NOT EXISTS t (a);")
    assert problem is not None and "was damaged" in problem and "x.db.damaged-" in problem
    assert db.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert [p.name for p in tmp_path.glob("x.db.damaged-*")]


def test_an_unusable_place_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DatabaseUnavailable, match=r"cannot use .*file"):
        open_database(tmp_path / "file" / "x.db", "")


# -- DaemonStore ---------------------------------------------------------------------------


def fill(path: Path) -> None:
    store = DaemonStore(path)
    store.put_created("a", {"name": "a", "executable": "/bin/true"})
    store.put_created("b", {"name": "b", "executable": "/bin/true"})
    store.put_changes("web", {"umask": "027"})
    store.close()


def overwrite(path: Path, content: bytes) -> None:
    """Replace a closed SQLite database (and drop its WAL) with ``content``."""
    for extra in path.parent.glob(f"{path.name}-*"):
        extra.unlink()
    path.write_bytes(content)


def test_a_truncated_daemons_db_is_restored_from_the_mirror(tmp_path: Path) -> None:
    path = tmp_path / "daemons.db"
    fill(path)
    overwrite(path, b"")
    store = DaemonStore(path)
    assert store.problem is not None and "restored 2 created daemons and 1 changes" in store.problem
    assert list(store.created()) == ["a", "b"] and store.changed() == {"web": {"umask": "027"}}


def test_a_damaged_daemons_db_is_restored_from_the_mirror(tmp_path: Path) -> None:
    path = tmp_path / "daemons.db"
    fill(path)
    overwrite(path, b"garbage" * 1000)
    store = DaemonStore(path)
    assert store.problem is not None and "was damaged" in store.problem
    assert list(store.created()) == ["a", "b"]


def test_a_damaged_mirror_is_written_again(tmp_path: Path) -> None:
    path = tmp_path / "daemons.db"
    fill(path)
    (tmp_path / "daemons.json").write_text("{truncat")
    store = DaemonStore(path)
    assert store.problem is not None and "written again" in store.problem
    assert len(json.loads((tmp_path / "daemons.json").read_text())["created"]) == 2


def test_both_lost_is_said_plainly(tmp_path: Path) -> None:
    path = tmp_path / "daemons.db"
    fill(path)
    overwrite(path, b"garbage" * 1000)
    (tmp_path / "daemons.json").unlink()
    store = DaemonStore(path)
    assert store.problem is not None and "are lost" in store.problem


# -- the recovery plan ----------------------------------------------------------------------


def marked(pid: int, daemon: str | None = None) -> Marked:
    info = proc_info(pid)
    assert info is not None
    return Marked(info, daemon)


def test_running_records_are_adopted_starting_ones_stopped(
    children: list[subprocess.Popen[bytes]],
) -> None:
    a, b, gone_tree = sleeper(children), sleeper(children), sleeper(children)
    records = {
        "a": record("a", a),
        "b": record("b", b, phase="starting"),
        "old": record("old", gone_tree),
        "dead": record("dead", 2**22 - 7),
    }
    plan = plan_recovery(records, {"a", "b", "dead"}, [marked(a), marked(b), marked(gone_tree)])
    assert set(plan.adoptable) == {"a"}
    assert {pid: (s.what, s.why) for pid, s in plan.strays.items()} == {
        b: ("b", "it was still starting"),
        gone_tree: ("old", "it is no longer in the tree"),
    }
    assert [r.name for r in plan.ended] == ["dead"]


def test_unrecorded_processes_are_stopped_but_an_adopted_daemons_own_are_kept(
    children: list[subprocess.Popen[bytes]],
) -> None:
    web = sleeper(children)
    worker = sleeper(children)  # e.g. nginx's worker: the daemon's name in its environment
    stray_exec = sleeper(children)
    stray_actor = sleeper(children)
    records = {"web": record("web", web, kind="exec")}
    plan = plan_recovery(
        records,
        {"web", "db"},
        [
            marked(web, "web"),
            marked(worker, "web"),
            marked(stray_exec, "db"),
            marked(stray_actor),
        ],
        state_damage="state.db was damaged",
    )
    assert set(plan.adoptable) == {"web"}
    assert set(plan.strays) == {stray_exec, stray_actor}
    found = plan.strays[stray_exec]
    assert (found.what, found.why) == ("db", "state.db did not record it (state.db was damaged)")


def test_descendants_and_session_members_of_adopted_daemons_are_kept(
    children: list[subprocess.Popen[bytes]],
) -> None:
    actor = sleeper(children)
    # a child of the adopted actor, and a process in the session of an adopted executable
    fake_child = Marked(ProcInfo(10**7, actor, 10**7, 0), None)
    session = sleeper(children)
    in_session = Marked(ProcInfo(10**7 + 1, 1, session, 0), None)
    records = {"act": record("act", actor), "ex": record("ex", session, kind="exec")}
    plan = plan_recovery(records, {"act", "ex"}, [fake_child, in_session])
    assert plan.strays == {}


# -- back-off: the first restart of a series is free ----------------------------------------


@given(
    runs=st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=12),
    u=st.floats(min_value=0.0, max_value=0.999),
)
def test_first_free_back_off_starts_at_zero_and_then_follows_the_series(
    runs: list[float], u: float
) -> None:
    spec = Backoff(min=0.1, max=5.0, random_factor=0.2, reset_after=1.0)
    free, plain = BackoffState(), BackoffState()
    now = 0.0
    for ran in runs:
        free, plain = free.started(now), plain.started(now)
        start, now = now, now + ran
        before = 0 if now - start >= spec.reset_period else free.count
        free, d_free = free.next_delay(spec, now, u, first_free=True)
        plain, d_plain = plain.next_delay(spec, now, u)
        assert free.count == plain.count == before + 1  # the same series, shifted
        if before == 0:
            assert d_free == 0.0  # the first restart of a series is immediate
        else:
            assert d_free == backoff_delay(before - 1, spec.min, spec.max, spec.random_factor, u)
        assert d_plain == backoff_delay(before, spec.min, spec.max, spec.random_factor, u)
        now += d_free


def test_owner_lookups_need_a_live_pid() -> None:
    assert proc_info(os.getpid()) is not None
    assert proc_info(2**22 - 3) is None


def test_a_stray_whose_pid_was_recycled_is_left_alone(
    children: list[subprocess.Popen[bytes]],
) -> None:
    """Between finding a stray and killing it, its PID may name someone else: not killed."""
    innocent, stray = sleeper(children), sleeper(children)
    innocent_ticks = proc_info(innocent).start_ticks  # type: ignore[union-attr]
    stray_ticks = proc_info(stray).start_ticks  # type: ignore[union-attr]
    left = kill_strays(
        {
            innocent: Stray("old", "recycled since", innocent_ticks + 1),
            stray: Stray("x", "a real stray", stray_ticks),
        },
        timeout=10,
    )
    assert left == []
    assert alive(innocent) and not alive(stray)
