"""Durable queue benchmark: puts acknowledged after fsync, group commit against one commit each.

Run with ``python -m bench.queues``. Measures, in one run and in one directory
(the same disk): puts per second through ``ikos.ipc._queues.QueueStore``
(WAL, ``synchronous=FULL``, each put answered once its transaction is on
disk) with 1, 16 and 64 concurrent producers, against plain ``sqlite3`` doing
one committed INSERT per message with the same settings, the floor that
group commit is meant to beat (goal: at least 4x). The measurements
alternate in rounds so that both sides see the same noise of this shared
machine; the median round counts.

:func:`measure_puts` takes any ``async put(payload)``: the broker's and the
client's end-to-end benchmarks can pass their own to get the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._common import Table

PAYLOAD = b"x" * 256
PRODUCERS = (1, 16, 64)


async def measure_puts(
    put: Callable[[bytes], Awaitable[Any]], producers: int, n: int, payload: bytes = PAYLOAD
) -> float:
    """Acknowledged puts per second: ``producers`` tasks awaiting ``put`` in turn, ``n`` in all."""
    per = max(1, n // producers)

    async def producer() -> None:
        for _ in range(per):
            await put(payload)

    t = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(producers)))
    return per * producers / (time.perf_counter() - t)


def store_puts(directory: Path, producers: int, n: int) -> tuple[float, float]:
    """Puts/s through a fresh QueueStore in ``directory``, and the mean puts per commit."""
    from ikos.ipc._queues import QueueStore

    path = directory / f"store-{producers}.db"

    async def main() -> tuple[float, float]:
        store = QueueStore(path)
        await store.open()
        try:
            await store.put("bench", PAYLOAD, "bytes")  # the file exists, the thread runs
            before = store.commits
            rate = await measure_puts(lambda p: store.put("bench", p, "bytes"), producers, n)
            return rate, n / max(1, store.commits - before)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    finally:
        _remove(path)


def sqlite_puts(directory: Path, n: int) -> float:
    """The floor: plain sqlite3, WAL, synchronous=FULL, one transaction (one fsync) per INSERT."""
    path = directory / "plain.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT,"
            " codec TEXT, enqueued_at REAL, deliveries INTEGER DEFAULT 0,"
            " dead INTEGER DEFAULT 0, payload BLOB)"
        )
        t = time.perf_counter()
        for _ in range(n):
            db.execute(
                "INSERT INTO messages (queue, codec, enqueued_at, payload) VALUES (?, ?, ?, ?)",
                ("bench", "bytes", time.time(), PAYLOAD),
            )  # autocommit: committed (and fsynced) here
        return n / (time.perf_counter() - t)
    finally:
        db.close()
        _remove(path)


def broker_puts(directory: Path, producers: int, n: int) -> float:
    """End to end: puts/s through a real broker process, ``ikos.ipc.queue(...).put``.

    ``producers`` 0: one thread pipelining ``put_async``.

    ``producers`` threads of this process put in turn over the process's one
    broker connection, each waiting for its answer (sent after the commit), as
    the threads of a service would; the broker batches what arrives meanwhile.
    """
    import ikos.ipc
    from ikos.ipc import _client

    root = directory / f"root-{producers}"
    ipc = root / "run" / "ikos" / "ipc"
    ipc.mkdir(parents=True, exist_ok=True)
    (ipc / "broker.json").write_text("{}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ikos.ipc._broker", "--root", str(root), "--log-level", "warning"]
    )
    try:
        deadline = time.monotonic() + 30
        while not (ipc / "broker.sock").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the broker did not start")
            time.sleep(0.02)
        queue = ikos.ipc.queue("bench", root=root)
        queue.put(PAYLOAD)  # connected, the database exists
        if producers == 0:  # one thread, pipelined: put_async, then wait for every id
            t = time.perf_counter()
            futures = [queue.put_async(PAYLOAD) for _ in range(n)]
            for f in futures:
                f.result(timeout=60)
            return n / (time.perf_counter() - t)
        per = max(1, n // producers)

        def producer() -> None:
            for _ in range(per):
                queue.put(PAYLOAD)

        threads = [threading.Thread(target=producer) for _ in range(producers)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return per * producers / (time.perf_counter() - t)
    finally:
        with _client._shared_lock:
            client = _client._shared.pop(_client.broker_socket(_client.instance_paths(root)), None)
        if client is not None:
            client.close()
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="puts per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the databases go")
    args = ap.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="ikos-bench-queues-", dir=args.dir))
    floor: list[float] = []
    ours: dict[int, list[float]] = {p: [] for p in PRODUCERS}
    batch: dict[int, list[float]] = {p: [] for p in PRODUCERS}
    e2e: dict[int, list[float]] = {p: [] for p in PRODUCERS}
    pipelined: list[float] = []
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} ...", flush=True)
            floor.append(sqlite_puts(directory, args.n))
            for p in PRODUCERS:
                rate, per_commit = store_puts(directory, p, args.n)
                ours[p].append(rate)
                batch[p].append(per_commit)
                e2e[p].append(broker_puts(directory, p, args.n))
            pipelined.append(broker_puts(directory, 0, args.n))
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    base = statistics.median(floor)
    table = Table(
        "Durable queues: puts acknowledged after fsync",
        [
            "producers",
            "sqlite3, 1 commit/put (puts/s)",
            "ikos QueueStore (puts/s)",
            "ratio",
            "puts/commit",
            "through the broker, ikos.ipc (puts/s)",
            "ratio",
        ],
    )
    for p in PRODUCERS:
        rate = statistics.median(ours[p])
        through = statistics.median(e2e[p])
        table.add(p, base, rate, rate / base, statistics.median(batch[p]), through, through / base)
    streamed = statistics.median(pipelined)
    table.add("1, pipelined", base, "-", "-", "-", streamed, streamed / base)
    table.notes.append(
        f"{args.n} puts of {len(PAYLOAD)} bytes per measurement, median of {args.rounds} "
        f"alternating rounds, in {args.dir or tempfile.gettempdir()} "
        f"(filesystem of the state directory matters: fsync cost is the whole story)."
    )
    table.notes.append(
        "Both sides: WAL, synchronous=FULL, a put answered only after its commit. "
        "The floor commits each INSERT alone (one fsync each); the store commits in one "
        "thread whatever arrived during its previous commit (group commit)."
    )
    best = max(statistics.median(ours[p]) for p in PRODUCERS) / base
    table.notes.append(f"Goal: at least 4x the floor by group commit; best ratio {best:.1f}x.")
    table.notes.append(
        "Through the broker: a real broker process, and P threads of one client process "
        "calling ikos.ipc.queue('bench').put(payload) in turn over its one connection, "
        "each answered after its commit. '1, pipelined': one thread calling "
        "queue.put_async() for every put (at most 512 unanswered), then waiting for all ids."
    )
    table.raw = {
        "floor": floor,
        "store": ours,
        "puts_per_commit": batch,
        "broker": e2e,
        "broker_pipelined": pipelined,
        "cpus": os.cpu_count(),
    }
    md = table.write("queues")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
