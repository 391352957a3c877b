"""ikos.ipc request/response against the raw floor, side by side in one run.

Run with ``python -m bench.ipc``. Measures round-trip p50/p99 of:

- the floor: a ``multiprocessing.Pipe`` round trip to a process that echoes;
- ``ActorRef.ask`` to the same actor, the path the next one wraps;
- ``ikos.ipc.connect("echo").request(m)`` to an actor: the owner's process goes
  straight to the mailbox (the ``ActorRef.ask`` path), the goal being 1.5x the floor;
- a request to a name served by another process (``ikos.ipc.serve``) through the
  broker: client -> broker -> server -> broker -> client, two hops each way;
- a request to the actor through the broker in JSON, the path of another user's
  process (the broker asks the actor in a worker thread).

The five are measured in short blocks in a rotating order, so that the noise
of this shared machine hits them alike and their ratios mean something. Writes
``bench/results/ipc.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import IkosInstance, Table, summary_us

MSG = {"op": "echo", "n": 1, "payload": "x" * 32}

TREE = textwrap.dedent(
    """
    import ikos

    class Echo(ikos.Actor):
        def receive(self, message):
            return message

    def tree():
        return ikos.Supervisor("root", children=[ikos.Child("echo", Echo)])
    """
)

SERVER = textwrap.dedent(
    """
    import sys, time, ikos.ipc
    ikos.ipc.serve("echo-served", lambda m: m.payload, threads=1)
    print("serving", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    """
)


def _pipe_echo(conn: Any) -> None:
    while True:
        m = conn.recv()
        if m is None:
            return
        conn.send(m)


def interleaved(
    paths: dict[str, Callable[[], Any]], n: int, block: int = 50
) -> dict[str, list[float]]:
    """``n`` round trips of every path, in short blocks, after a warm-up.

    Blocks of ``block`` calls, the paths in a rotating order from one round to
    the next: every path meets the same noise of this shared machine, and none
    always comes right after the broker's paths (whose processes then hold the
    CPUs), which one call of each in turn showed to skew the ratios.
    """
    for call in paths.values():
        for _ in range(300):
            call()
    calls = list(paths.items())
    samples: dict[str, list[float]] = {name: [] for name in paths}
    clock = time.perf_counter
    for round_ in range(max(1, n // block)):
        shift = round_ % len(calls)
        for name, call in calls[shift:] + calls[:shift]:
            out = samples[name]
            for _ in range(block):
                t = clock()
                call()
                out.append(clock() - t)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="round trips per path")
    args = ap.parse_args(argv)

    import ikos
    import ikos.ipc
    from ikos.ipc._client import shared_client

    print("ikos ...", flush=True)
    inst = IkosInstance(TREE, prefix="ikos-bench-ipc-")
    a, b = mp.Pipe()
    floor = mp.Process(target=_pipe_echo, args=(b,))
    floor.start()
    env = {**os.environ, "IKOS_ROOT": str(inst.root)}
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == "serving\n"
        actor = ikos.ipc.connect("echo", root=inst.root)
        served = ikos.ipc.connect("echo-served", root=inst.root)
        broker = shared_client(inst.root)
        assert actor.direct and not served.direct

        def floor_call() -> Any:
            a.send(MSG)
            return a.recv()

        ref = ikos.ActorRef("echo", root=inst.root)
        paths: dict[str, Callable[[], Any]] = {
            "floor": floor_call,
            "ask": lambda: ref.ask(MSG),
            "actor": lambda: actor.request(MSG),
            "served": lambda: served.request(MSG),
            "actor_via_broker": lambda: broker.request("echo", MSG, codec="json"),
        }
        print(f"{args.n} round trips per path, in rotating blocks ...", flush=True)
        samples = interleaved(paths, args.n)
    finally:
        a.send(None)
        floor.join()
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)
        inst.close()

    figures = {name: summary_us(s) for name, s in samples.items()}
    fl = figures["floor"]
    table = Table(
        "IPC request/response: ikos.ipc against the floor",
        ["path", "p50 (µs)", "p99 (µs)", "p50 / floor", "p99 / floor"],
    )
    labels = {
        "floor": "floor: multiprocessing.Pipe round trip",
        "ask": "ActorRef.ask (the mailbox path itself, for reference)",
        "actor": "ikos.ipc to an actor (direct, mailbox)",
        "served": "ikos.ipc to a served name (through the broker)",
        "actor_via_broker": "ikos.ipc to an actor through the broker (JSON)",
    }
    for name, label in labels.items():
        f = figures[name]
        table.add(
            label, f["p50_us"], f["p99_us"], f["p50_us"] / fl["p50_us"], f["p99_us"] / fl["p99_us"]
        )
    ratio = figures["actor"]["p50_us"] / fl["p50_us"]
    table.notes += [
        f"Closing note: ikos.ipc to an actor is {ratio:.2f}x the floor at p50 "
        f"({'within' if ratio <= 1.5 else 'beyond'} the 1.5x goal); through the broker, "
        f"{figures['served']['p50_us'] / fl['p50_us']:.1f}x to a served name.",
        f"{args.n} round trips per path, in blocks of 50 in a rotating order, after a "
        "warm-up; "
        f"message {MSG!r} (pickle codec where the path allows it).",
        "Goal: the actor path within 1.5x of the floor: it is ActorRef.ask plus the "
        "IpcMessage wrapping (about 1 µs). Through the broker a request crosses the broker's "
        "loop twice and, to a served name, two more sockets and the server's thread hand-off.",
    ]
    table.raw = {name: {"summary": figures[name]} for name in samples}
    md = table.write("ipc")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
