"""The durable queue store: order, leases, redelivery, dead letters, group commit, crashes.

Each test runs a real store on a real SQLite file in its own event loop. The
crash test kills a process holding the store with SIGKILL while producers and
consumers run, several times, and checks every acknowledged put against the
database; the full-disk test fills a small tmpfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from ikos.ipc._queues import (
    NotLeased,
    QueueError,
    QueueFull,
    QueueStore,
    QueueUnavailable,
    check_queue_name,
)

Body = Callable[[QueueStore], Awaitable[Any]]


def run(path: Path, body: Body, **options: Any) -> Any:
    """Open a store at ``path`` with ``options``, run ``body`` with it, close it."""

    async def main() -> Any:
        store = QueueStore(path, **options)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queues.db"


def rows(path: Path) -> dict[int, tuple[str, bytes, int, int]]:
    """id → (queue, payload, deliveries, dead), read straight from the file."""
    con = sqlite3.connect(path)
    try:
        found = con.execute("SELECT id, queue, payload, deliveries, dead FROM messages")
        return {r[0]: (r[1], bytes(r[2]), r[3], r[4]) for r in found}
    finally:
        con.close()


# -- order and leases ---------------------------------------------------------------------


def test_messages_come_out_in_the_order_they_were_put_with_codec_and_count(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        ids = [await s.put("jobs", f"m{i}".encode(), "json") for i in range(20)]
        assert ids == sorted(ids) and len(set(ids)) == 20
        for i, msg_id in enumerate(ids):
            m = await s.get("jobs", "c", timeout=0)
            assert m is not None
            assert (m.id, m.queue, m.payload, m.codec, m.deliveries) == (
                msg_id,
                "jobs",
                f"m{i}".encode(),
                "json",
                1,
            )
            await s.ack("jobs", m.id, "c")
        assert await s.get("jobs", "c", timeout=0) is None
        (info,) = s.queues()
        assert (info.name, info.ready, info.leased, info.puts, info.acks, info.bytes) == (
            "jobs",
            0,
            0,
            20,
            20,
            0,
        )

    run(db, body)


def test_queues_are_separate(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        await s.put("a", b"1", "bytes")
        await s.put("b.c", b"2", "bytes")
        m = await s.get("b.c", "x", 0)
        assert m is not None and m.payload == b"2"
        assert await s.get("b.c", "x", 0) is None
        assert {i.name: (i.ready, i.leased) for i in s.queues()} == {"a": (1, 0), "b.c": (0, 1)}

    run(db, body)


def test_a_leased_message_is_nobody_elses_and_only_its_holder_may_ack_it(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        await s.put("jobs", b"only", "bytes")
        m = await s.get("jobs", "alice", 0)
        assert m is not None
        assert await s.get("jobs", "bob", 0) is None
        with pytest.raises(NotLeased, match="not leased to this consumer") as err:
            await s.ack("jobs", m.id, "bob")
        assert err.value.error_type == "bad_request" and err.value.queue == "jobs"
        with pytest.raises(NotLeased):
            await s.ack("other", m.id, "alice")
        with pytest.raises(NotLeased):
            await s.nack("jobs", m.id, "bob")
        with pytest.raises(NotLeased):
            await s.ack("jobs", 12345, "alice")
        await s.ack("jobs", m.id, "alice")
        with pytest.raises(NotLeased, match="already acked"):
            await s.ack("jobs", m.id, "alice")

    run(db, body)


def test_an_unacked_message_comes_back_after_the_visibility_timeout(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        await s.put("jobs", b"slow", "bytes")
        first = await s.get("jobs", "a", 0)
        assert first is not None and first.deliveries == 1
        # A waiting get is served by the loop's own sweep timer, nobody calls sweep().
        again = await s.get("jobs", "b", timeout=30)
        assert again is not None and again.id == first.id and again.deliveries == 2
        with pytest.raises(NotLeased, match="visibility"):
            await s.ack("jobs", first.id, "a")
        await s.ack("jobs", again.id, "b")
        (info,) = s.queues()
        assert info.redeliveries == 1 and info.acks == 1

    run(db, body, visibility_timeout=0.2)


def test_nack_returns_the_message_at_once_or_after_its_delay(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        await s.put("jobs", b"x", "bytes")
        m = await s.get("jobs", "a", 0)
        assert m is not None
        await s.nack("jobs", m.id, "a")
        m = await s.get("jobs", "a", 0)
        assert m is not None and m.deliveries == 2
        await s.nack("jobs", m.id, "a", delay=0.3)
        (info,) = s.queues()
        assert (info.ready, info.delayed, info.leased) == (0, 1, 0)
        assert await s.get("jobs", "a", 0) is None
        m = await s.get("jobs", "a", timeout=30)
        assert m is not None and m.deliveries == 3
        with pytest.raises(QueueError, match="delay"):
            await s.nack("jobs", m.id, "a", delay=-1)

    run(db, body)


def test_after_max_deliveries_failures_the_message_is_a_dead_letter(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        poison = await s.put("jobs", b"poison", "json")
        good = await s.put("jobs", b"good", "json")
        for n in (1, 2, 3):
            m = await s.get("jobs", "a", 0)
            assert m is not None and (m.id, m.deliveries) == (poison, n)
            await s.nack("jobs", m.id, "a")
        m = await s.get("jobs", "a", 0)
        assert m is not None and m.id == good
        (info,) = s.queues()
        assert (info.dead, info.dead_lettered, info.ready, info.leased) == (1, 1, 0, 1)
        (dead,) = await s.dead("jobs", 10)
        assert (dead.id, dead.payload, dead.codec, dead.deliveries) == (
            poison,
            b"poison",
            "json",
            3,
        )
        assert await s.requeue_dead("jobs") == 1
        m = await s.get("jobs", "a", 0)
        assert m is not None and (m.id, m.deliveries) == (poison, 1)
        assert await s.dead("jobs", 10) == []

    run(db, body, max_deliveries=3)
    assert [r[3] for r in rows(db).values()] == [0, 0]


def test_visibility_timeouts_and_consumer_deaths_count_towards_dead_letters(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        msg_id = await s.put("jobs", b"p", "bytes")
        assert (await s.get("jobs", "a", 0)) is not None
        s.consumer_gone("a")
        assert (await s.get("jobs", "b", 0)) is not None
        assert await s.get("jobs", "c", timeout=0.5) is None  # expires meanwhile: dead
        (info,) = s.queues()
        assert (info.dead, info.ready, info.leased) == (1, 0, 0)
        assert [m.id for m in await s.dead("jobs", 5)] == [msg_id]

    run(db, body, max_deliveries=2, visibility_timeout=0.2)


def test_consumer_gone_returns_its_leases_at_once_and_drops_its_waiting_gets(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        for i in range(3):
            await s.put("jobs", b"%d" % i, "bytes")
        held = [await s.get("jobs", "dead-conn", 0) for _ in range(3)]
        waiting = asyncio.create_task(s.get("other", "dead-conn", timeout=30))
        await asyncio.sleep(0)  # let it queue up
        s.consumer_gone("dead-conn")
        assert await waiting is None
        again = [await s.get("jobs", "b", 0) for _ in range(3)]
        assert [m.id for m in again if m] == [m.id for m in held if m]
        assert all(m is not None and m.deliveries == 2 for m in again)

    run(db, body)


def test_waiting_gets_are_served_first_come_first_served(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        waiters = []
        for c in ("first", "second", "third"):
            waiters.append(asyncio.create_task(s.get("jobs", c, timeout=30)))
            await asyncio.sleep(0)
        ids = [await s.put("jobs", b"%d" % i, "bytes") for i in range(3)]
        got = [await w for w in waiters]
        assert [m.id for m in got if m] == ids
        # a get that times out leaves no waiter and no queue behind
        assert await s.get("nobody", "x", timeout=0.05) is None
        assert "nobody" not in {i.name for i in s.queues()}

    run(db, body)


def test_a_cancelled_waiting_get_gives_back_nothing_and_loses_nothing(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        waiting = asyncio.create_task(s.get("jobs", "a", timeout=30))
        await asyncio.sleep(0)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await s.put("jobs", b"x", "bytes")
        m = await s.get("jobs", "b", 0)
        assert m is not None and m.deliveries == 1

    run(db, body)


def test_a_put_or_ack_whose_caller_is_cancelled_still_counts_once_committed(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        put = asyncio.create_task(s.put("jobs", b"orphan", "bytes"))
        await asyncio.sleep(0)  # submitted to the committer
        put.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await put
        m = await s.get("jobs", "a", timeout=30)  # committed: it must be handed out
        assert m is not None and m.payload == b"orphan"
        ack = asyncio.create_task(s.ack("jobs", m.id, "a"))
        await asyncio.sleep(0)
        ack.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ack
        assert await s.get("jobs", "b", timeout=0.3) is None
        (info,) = s.queues()
        assert (info.puts, info.acks, info.ready, info.leased) == (1, 1, 0, 0)

    run(db, body)
    assert rows(db) == {}


# -- group commit and durability -----------------------------------------------------------


def test_concurrent_puts_share_transactions(db: Path) -> None:
    async def body(s: QueueStore) -> tuple[int, list[int]]:
        before = s.commits
        ids = await asyncio.gather(*(s.put("jobs", b"x" * 100, "bytes") for _ in range(200)))
        return s.commits - before, ids

    commits, ids = run(db, body)
    # 200 puts arriving together: the first commit takes what is there, the rest
    # arrive during it and share the next one or two.
    assert 1 <= commits < 20, commits
    assert sorted(rows(db)) == sorted(ids)


def test_a_put_and_an_ack_are_on_disk_when_they_return(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        msg_id = await s.put("jobs", b"durable", "bytes")
        # another connection sees the committed row before the store is closed
        assert rows(db)[msg_id] == ("jobs", b"durable", 0, 0)
        m = await s.get("jobs", "a", 0)
        assert m is not None
        await s.ack("jobs", m.id, "a")
        assert msg_id not in rows(db)

    run(db, body)


def test_after_a_restart_everything_not_acked_is_ready_with_its_count(db: Path) -> None:
    async def first(s: QueueStore) -> list[int]:
        ids = [await s.put("jobs", b"%d" % i, "bytes") for i in range(4)]
        for _ in range(3):
            assert await s.get("jobs", "a", 0) is not None  # leased, never acked
        await s.ack("jobs", ids[0], "a")
        return ids

    ids = run(db, first)

    async def second(s: QueueStore) -> None:
        (info,) = s.queues()
        assert (info.ready, info.leased, info.bytes) == (3, 0, 3)
        got = [await s.get("jobs", "b", 0) for _ in range(3)]
        assert [(m.id, m.deliveries) for m in got if m] == [
            (ids[1], 2),
            (ids[2], 2),
            (ids[3], 1),
        ]
        # ids are never given twice, even when the newest was acked
        newest = ids[-1]
        for m in got:
            assert m is not None
            await s.ack("jobs", m.id, "b")
        assert await s.put("jobs", b"new", "bytes") > newest

    run(db, second)


def test_a_message_on_its_last_delivery_when_the_store_died_is_dead_on_reopening(
    db: Path,
) -> None:
    async def first(s: QueueStore) -> int:
        msg_id = await s.put("jobs", b"p", "bytes")
        for _ in range(2):
            m = await s.get("jobs", "a", 0)
            assert m is not None
            if m.deliveries < 2:
                await s.nack("jobs", m.id, "a")
        return msg_id  # leased on its 2nd (last) delivery when the store closes

    msg_id = run(db, first, max_deliveries=2)

    async def second(s: QueueStore) -> None:
        assert await s.get("jobs", "b", 0) is None
        assert [m.id for m in await s.dead("jobs", 10)] == [msg_id]

    run(db, second, max_deliveries=2)


def test_a_full_queue_refuses_puts(db: Path) -> None:
    async def body(s: QueueStore) -> None:
        for i in range(3):
            await s.put("jobs", b"%d" % i, "bytes")
        with pytest.raises(QueueFull, match="limit of 3 messages") as err:
            await s.put("jobs", b"x", "bytes")
        assert err.value.error_type == "full"
        await s.put("other", b"x", "bytes")  # the bound is per queue
        m = await s.get("jobs", "a", 0)
        assert m is not None
        await s.ack("jobs", m.id, "a")
        await s.put("jobs", b"fits again", "bytes")

    run(db, body, max_messages=3)


@pytest.mark.parametrize(
    "name",
    ["", "a..b", ".a", "a.", "jobs.*", "jobs.#", "sp ace", "é", "x" * 256, 7, None],
)
def test_bad_queue_names_are_refused_with_the_rule(db: Path, name: Any) -> None:
    with pytest.raises(QueueError, match=r"queue name|bad segment"):
        check_queue_name(name)

    async def body(s: QueueStore) -> None:
        with pytest.raises(QueueError):
            await s.put(name, b"x", "bytes")
        with pytest.raises(QueueError):
            await s.get(name, "a", 0)

    run(db, body)


def test_good_queue_names_and_bad_arguments(db: Path) -> None:
    for name in ("jobs", "mail.out-going", "a_b@c:d.9", "x" * 255):
        assert check_queue_name(name) == name

    async def body(s: QueueStore) -> None:
        with pytest.raises(QueueError, match="unknown codec 'yaml'"):
            await s.put("jobs", b"x", "yaml")
        with pytest.raises(TypeError):
            await s.put("jobs", "not bytes", "bytes")  # type: ignore[arg-type]
        for bad in (-1, float("nan"), float("inf"), "1"):
            with pytest.raises(QueueError, match="timeout"):
                await s.get("jobs", "a", bad)  # type: ignore[arg-type]
        with pytest.raises(QueueError, match="limit"):
            await s.dead("jobs", -1)
        assert s.queues() == []

    run(db, body)
    with pytest.raises(ValueError, match="max_deliveries"):
        QueueStore(db, max_deliveries=0)
    with pytest.raises(ValueError, match="visibility_timeout"):
        QueueStore(db, visibility_timeout=0)


def test_a_closed_store_refuses_and_close_waits_for_pending_commits(db: Path) -> None:
    async def main() -> None:
        s = QueueStore(db)
        await s.open()
        puts = [asyncio.create_task(s.put("jobs", b"x", "bytes")) for _ in range(50)]
        await asyncio.sleep(0)  # all submitted, not all committed
        await s.close()
        ids = await asyncio.gather(*puts)
        assert sorted(rows(db)) == sorted(ids)
        with pytest.raises(QueueUnavailable, match="not open") as err:
            await s.put("jobs", b"x", "bytes")
        assert err.value.error_type == "unavailable"

    asyncio.run(main())


# -- kill -9 -------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, os, random, sys
    from pathlib import Path
    from ikos.ipc._queues import QueueStore

    path, log = Path(sys.argv[1]), sys.argv[2]
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(line):
        os.write(fd, (line + "\\n").encode())  # one write: whole or absent after SIGKILL

    async def producer(s, p):
        n = 0
        while True:
            n += 1
            body = f"{os.getpid()}-{p}-{n}"
            msg_id = await s.put("jobs", body.encode(), "bytes")
            note(f"P {msg_id} {body}")

    async def consumer(s, c):
        while True:
            m = await s.get("jobs", c, 1.0)
            if m is None:
                continue
            r = random.random()
            if r < 0.6:
                note(f"a {m.id}")  # from here on, the message may be gone
                await s.ack("jobs", m.id, c)
                note(f"A {m.id}")
            elif r < 0.8:
                await s.nack("jobs", m.id, c)
            # else: keep it leased until the visibility timeout

    async def main():
        s = QueueStore(path, visibility_timeout=0.3, max_deliveries=1000)
        await s.open()
        note("R")
        await asyncio.gather(
            *(producer(s, p) for p in range(16)), *(consumer(s, c) for c in range(4))
        )

    asyncio.run(main())
    """
)


def test_no_acknowledged_put_is_lost_and_no_acked_message_returns_across_kill_9(
    tmp_path: Path,
) -> None:
    db = tmp_path / "queues.db"
    log = tmp_path / "log"
    log.touch()
    rng = random.Random()
    for _ in range(5):
        before = log.read_text().count("\nP ")
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(log)])
        try:
            target = before + rng.randrange(200, 2000)
            wait_for(lambda t=target: log.read_text().count("\nP ") >= t, timeout=120)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL

    put: dict[int, bytes] = {}
    ack_started: set[int] = set()
    acked: set[int] = set()
    for line in log.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["P"] and len(parts) == 3:
            put[int(parts[1])] = parts[2].encode()
        elif parts[:1] == ["a"] and len(parts) == 2:
            ack_started.add(int(parts[1]))
        elif parts[:1] == ["A"] and len(parts) == 2:
            acked.add(int(parts[1]))
    assert acked and len(put) > 250

    async def check(s: QueueStore) -> None:
        (info,) = s.queues()
        assert info.leased == 0 and info.ready + info.dead == len(rows(db))

    run(db, check, max_deliveries=1000)
    stored = rows(db)
    missing = [i for i in put if i not in ack_started and i not in stored]
    assert not missing, f"acknowledged puts lost: {missing[:20]}"
    assert all(stored[i][1] == put[i] for i in put if i in stored)
    back = acked & stored.keys()
    assert not back, f"acked messages came back: {sorted(back)[:20]}"


def test_a_damaged_file_is_moved_aside_and_the_store_starts_empty_saying_so(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database" * 1000)

    async def body(s: QueueStore) -> str | None:
        assert s.queues() == []
        await s.put("jobs", b"x", "bytes")
        return s.damage

    damage = run(db, body)
    assert damage is not None and "damaged" in damage and "moved to queues.db.damaged-" in damage
    assert len(list(db.parent.glob("queues.db.damaged-*"))) == 1


# -- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    where = Path(tempfile.mkdtemp(prefix="ikos-queues-tmpfs-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def test_a_put_that_cannot_commit_on_a_full_disk_fails_and_none_is_acknowledged_falsely(
    small_tmpfs: Path,
) -> None:
    db = small_tmpfs / "queues.db"

    async def body(s: QueueStore) -> tuple[list[int], int]:
        acknowledged: list[int] = []
        failures = 0
        for _ in range(200):
            results = await asyncio.gather(
                *(s.put("jobs", os.urandom(16 << 10), "bytes") for _ in range(4)),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, int):
                    acknowledged.append(r)
                else:
                    assert isinstance(r, QueueUnavailable), r
                    assert "could not be committed" in str(r) and "full" in str(r).lower()
                    failures += 1
            if failures:
                break
        assert failures, "the disk never filled"
        (info,) = s.queues()
        assert info.ready == len(acknowledged)
        # room again: the same store commits again
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
        acknowledged.append(await s.put("jobs", b"after", "bytes"))
        return acknowledged, failures

    acknowledged, _ = run(db, body)
    stored = rows(db)
    assert set(acknowledged) <= stored.keys()
