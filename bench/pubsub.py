"""Publish/subscribe benchmark: deliveries per second through the broker, against the floor.

Run with ``python -m bench.pubsub``. One publisher process sends small messages as
fast as it can (pipelined, several frames per write); 1, 10 and 100 subscriber
processes, each its own connection subscribed to ``bench.#``, count what arrives.
The figure is deliveries per second: messages received by all subscribers together
over the time from the first publish to the last subscriber seeing the end marker.

The floor is the same fan-out without a broker: one process writes every frame to
every subscriber over its own socketpair, in the same batches, and the subscribers
parse the same frames with the same reader. The broker's ratio to it is what the
extra hop (read, match, queue, write again) costs. The goal of issue 8 is at least
100k deliveries/s at 10 subscribers on this machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import Table
from ikos.ipc._frames import FrameReader, encode_frame

PAYLOAD = b'{"n": 1, "text": "a small event of about sixty four bytes.."}'
BATCH = 64  # frames per write, on both sides
END = "bench.end"


def _count(sock: socket.socket, report: Any) -> None:
    """A subscriber: count messages until the end marker; report (count, dropped, t_end)."""
    reader = FrameReader(1 << 26)
    count = dropped = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        reader.feed(data)
        for frame in reader.frames():
            if frame.op == "dropped":
                dropped += int(frame.header["count"])
            elif frame.header.get("topic") == END:
                report.send((count, dropped, time.time()))
                return
            else:
                count += 1
    report.send((count, dropped, time.time()))


def _subscriber(path: str, report: Any, ready: Any) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(encode_frame({"op": "hello", "version": 1, "name": "bench-sub"}))
    sock.sendall(encode_frame({"op": "subscribe", "id": 1, "pattern": "bench.#"}))
    reader = FrameReader(1 << 26)
    while True:  # welcome, then the subscription's ok
        reader.feed(sock.recv(65536))
        if any(f.op == "ok" for f in reader.frames()):
            break
    ready.send(True)
    _count(sock, report)


def _floor_subscriber(sock: socket.socket, report: Any, ready: Any) -> None:
    ready.send(True)
    _count(sock, report)


def _batches(frame: bytes, n: int) -> tuple[bytes, int]:
    return frame * BATCH, n // BATCH


def run_broker(root: Path, subscribers: int, messages: int) -> dict[str, Any]:
    """Deliveries/s through a real broker process to ``subscribers`` subscriber processes."""
    ipc = root / "run" / "ikos" / "ipc"
    ipc.mkdir(parents=True, exist_ok=True)
    # a bound above the run's size: what is measured is the rate, not drop-oldest
    (ipc / "broker.json").write_text(json.dumps({"subscriber_queue": messages + BATCH + 1}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ikos.ipc._broker", "--root", str(root), "--log-level", "warning"]
    )
    path = root / "run" / "ikos" / "ipc" / "broker.sock"
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the broker did not start")
            time.sleep(0.02)
        ctx = mp.get_context("fork")
        pipes, procs = [], []
        for _ in range(subscribers):
            report_r, report_w = ctx.Pipe(duplex=False)
            ready_r, ready_w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_subscriber, args=(str(path), report_w, ready_w))
            p.start()
            pipes.append((report_r, ready_r))
            procs.append(p)
        for _, ready_r in pipes:
            ready_r.recv()
        pub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        pub.connect(str(path))
        pub.sendall(encode_frame({"op": "hello", "version": 1, "name": "bench-pub"}))
        frame = encode_frame({"op": "publish", "topic": "bench.x", "codec": "json"}, PAYLOAD)
        batch, rounds = _batches(frame, messages)
        cpu0 = _cpu_seconds(proc.pid)
        t0 = time.time()
        for _ in range(rounds):
            pub.sendall(batch)
        pub.sendall(encode_frame({"op": "publish", "topic": END, "codec": "json"}, b"0"))
        results = [r.recv() for r, _ in pipes]
        cpu = _cpu_seconds(proc.pid) - cpu0
        for p in procs:
            p.join(30)
        pub.close()
        figures = _figures(results, t0, rounds * BATCH, subscribers)
        figures["broker_cpu_us_per_publish"] = cpu / (rounds * BATCH) * 1e6
        return figures
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def run_floor(subscribers: int, messages: int) -> dict[str, Any]:
    """The same fan-out written by one process straight to socketpairs, no broker."""
    ctx = mp.get_context("fork")
    ends, pipes, procs = [], [], []
    for _ in range(subscribers):
        ours, theirs = socket.socketpair()
        report_r, report_w = ctx.Pipe(duplex=False)
        ready_r, ready_w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_floor_subscriber, args=(theirs, report_w, ready_w))
        p.start()
        theirs.close()
        ends.append(ours)
        pipes.append((report_r, ready_r))
        procs.append(p)
    for _, ready_r in pipes:
        ready_r.recv()
    # what a broker would send: the delivery frame, encoded once
    frame = encode_frame(
        {"op": "message", "topic": "bench.x", "pattern": "bench.#", "codec": "json"}, PAYLOAD
    )
    batch, rounds = _batches(frame, messages)
    end = encode_frame({"op": "message", "topic": END, "pattern": "bench.#", "codec": "json"})
    t0 = time.time()
    for _ in range(rounds):
        for s in ends:
            s.sendall(batch)
    for s in ends:
        s.sendall(end)
    results = [r.recv() for r, _ in pipes]
    for p in procs:
        p.join(30)
    for s in ends:
        s.close()
    return _figures(results, t0, rounds * BATCH, subscribers)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _figures(results: list[Any], t0: float, published: int, subscribers: int) -> dict[str, Any]:
    received = sum(r[0] for r in results)
    dropped = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results) - t0
    return {
        "subscribers": subscribers,
        "published": published,
        "received": received,
        "dropped": dropped,
        "seconds": elapsed,
        "deliveries_per_s": received / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000, help="published per run (1 and 10)")
    ap.add_argument("--fanouts", default="1,10,100")
    args = ap.parse_args(argv)
    fanouts = [int(x) for x in args.fanouts.split(",")]
    table = Table(
        "Publish/subscribe: deliveries per second through the broker, against the floor",
        [
            "subscribers",
            "floor (deliveries/s)",
            "broker (deliveries/s)",
            "broker / floor",
            "dropped",
            "broker CPU per publish (µs)",
        ],
    )
    raw: dict[str, Any] = {}
    base = Path(tempfile.mkdtemp(prefix="ikos-bench-pubsub-"))
    try:
        for n in fanouts:
            # at most ten times --messages deliveries per run
            messages = max(BATCH, args.messages * 10 // max(n, 10))
            print(f"{n} subscribers, {messages} messages: floor ...", flush=True)
            floor = run_floor(n, messages)
            print(f"{n} subscribers: broker ...", flush=True)
            broker = run_broker(base / f"root{n}", n, messages)
            raw[str(n)] = {"floor": floor, "broker": broker}
            table.add(
                n,
                floor["deliveries_per_s"],
                broker["deliveries_per_s"],
                broker["deliveries_per_s"] / floor["deliveries_per_s"],
                broker["dropped"],
                broker["broker_cpu_us_per_publish"],
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    table.notes.append(
        f"{len(PAYLOAD)}-byte JSON payloads; publisher and floor write {BATCH} frames per call;"
        " subscribers are processes parsing frames with ikos.ipc._frames.FrameReader."
    )
    table.notes.append(
        "The broker runs with subscriber_queue above the run's size, so that it measures the"
        " sustained rate: with the default bound (10,000) a publisher faster than its"
        " subscribers loses the oldest deliveries instead (dropped, expected 0 here), and"
        " deliveries/s counts only what arrived."
    )
    table.notes.append(
        f"{os.cpu_count()} CPUs shared by the publisher, broker and subscribers: with one"
        " subscriber the three processes compete for them, so the rate is the slowest of"
        " the three; the broker's own cost is its CPU time per publish."
    )
    table.raw = raw
    path = table.write("pubsub")
    print(table.markdown())
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
