"""Registry benchmark: 10,000 services in a real ikosd, discovered from another process.

Run with ``python -m bench.registry``. One ikosd (empty tree, no metrics)
holds the registry; this process registers 10,000 services one request at
a time (each answered after its commit), then another process, a plain
client of the control socket as any user program would be, measures
discovery by exact name, by glob pattern and by capability, and the time to
list all 10,000. Finally 8 processes register 1,000 services each at once,
which shows the group commit (one commit per turn of ikosd's loop, shared by
every request of that turn).

There is no registry peer installed here (Consul, etcd), so the figures sit
beside two floors measured in the same run: ``hello``, the cheapest request
on the same control socket (what any request costs before the registry does
anything), and the same queries on a :class:`RegistryStore` in-process (what
SQLite costs without any IPC).

A second table times the start-up of a 200-daemon dependency graph (5
layers of 40 actors, each requiring two of the layer below) in waves,
against the same daemons in sequence: the same ikosd and tree with an
``after`` chain added through the daemons in their start order, which
leaves exactly one daemon per wave. Each is timed with actors ready at once
and with actors whose ``on_start`` takes 50 ms, as a daemon that opens
files or sockets does; both figures are ``ikosctl start pool`` to its
answer, median of 3, after a stop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench._common import RESULTS, IkosInstance, Table, percentile

EMPTY_TREE = "import ikos\ntree = ikos.Supervisor('root')\n"
N_SERVICES = 10_000
WRITERS = 8
PER_WRITER = 1_000


def service_fields(i: int) -> dict[str, Any]:
    """A plausible service: 10 types, 100 capabilities of 100 services each."""
    return {
        "type": f"t{i % 10}",
        "version": "1.0",
        "endpoint": f"tcp://127.0.0.1:{10_000 + i}",
        "capabilities": [f"cap{i % 100}", "all"],
        "description": f"benchmark service {i}",
    }


def register_sequentially(root: Path, n: int) -> float:
    """Register ``n`` services from this process, one request at a time; return per second."""
    import ikos.registry as registry

    started = time.perf_counter()
    for i in range(n):
        registry.register(f"svc/{i:05d}", root=root, **service_fields(i))
    return n / (time.perf_counter() - started)


READER = textwrap.dedent(
    """
    import json, random, sys, time
    from ikos.platform._control import ControlClient
    from ikos.platform._paths import InstancePaths

    root, n, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    client = ControlClient(InstancePaths.for_root(root), timeout=120)
    rnd = random.Random(7)

    def timed(verb, make_args, count):
        samples = []
        for _ in range(count):
            args = make_args()
            t = time.perf_counter()
            result = client.call(verb, args)
            samples.append(time.perf_counter() - t)
        return samples, len(result) if isinstance(result, list) else None

    for _ in range(200):  # warm up the connection and the manager's caches
        client.call("hello")
        client.call("discover", {"name": "svc/00000"})
    out = {}
    out["hello"], _ = timed("hello", dict, n)
    out["name"], out["name_n"] = timed(
        "discover", lambda: {"name": f"svc/{rnd.randrange(total):05d}"}, n)
    out["pattern"], out["pattern_n"] = timed(
        "discover", lambda: {"pattern": f"svc/{rnd.randrange(total // 10):04d}*"}, n)
    out["capability"], out["capability_n"] = timed(
        "discover", lambda: {"capability": f"cap{rnd.randrange(100)}"}, max(1, n // 10))
    out["list"], out["list_n"] = timed("services", dict, 20)
    print(json.dumps(out))
    """
)


def read_from_another_process(root: Path, n: int, total: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run(
        [sys.executable, "-c", READER, str(root), str(n), str(total)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
        check=True,
    )
    result: dict[str, Any] = json.loads(res.stdout)
    return result


WRITER = textwrap.dedent(
    """
    import json, sys, time
    import ikos.registry as registry

    root, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    registry.list(root=root)  # connected and warm
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    for i in range(n):
        registry.register(f"{prefix}/{i:05d}", type="par", capabilities=["par"], root=root)
    print(json.dumps({"start": start, "end": time.time()}), flush=True)
    """
)


def register_concurrently(root: Path, writers: int, per_writer: int) -> float:
    """``writers`` processes register ``per_writer`` services each at once; total per second."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), f"par/{w}", str(per_writer)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for w in range(writers)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a writer did not start")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        spans = []
        for proc in procs:
            assert proc.stdout is not None
            spans.append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=60)
            if proc.stdout is not None:
                proc.stdout.close()
    elapsed = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    return writers * per_writer / elapsed


def in_process_floor(total: int, n: int) -> dict[str, Any]:
    """The same queries on a RegistryStore in this process: SQLite without IPC."""
    import random

    from ikos.registry._service import ServiceInfo
    from ikos.registry._store import RegistryStore

    directory = Path(tempfile.mkdtemp(prefix="ikos-bench-store-"))
    try:
        store = RegistryStore(directory / "registry.db")
        pid, started = os.getpid(), time.time()
        t = time.perf_counter()
        for i in range(total):
            store.register(ServiceInfo(f"svc/{i:05d}", **service_fields(i)), pid, started)
            store.commit()
        register_rate = total / (time.perf_counter() - t)
        rnd = random.Random(7)
        out: dict[str, Any] = {"register_per_s": register_rate}
        for key, make in (
            ("name", lambda: {"name": f"svc/{rnd.randrange(total):05d}"}),
            ("pattern", lambda: {"pattern": f"svc/{rnd.randrange(total // 10):04d}*"}),
            ("capability", lambda: {"capability": f"cap{rnd.randrange(100)}"}),
        ):
            samples = []
            for _ in range(n if key != "capability" else max(1, n // 10)):
                args = make()
                t = time.perf_counter()
                store.discover(**args)
                samples.append(time.perf_counter() - t)
            out[key] = samples
        samples = []
        for _ in range(20):
            t = time.perf_counter()
            store.list()
            samples.append(time.perf_counter() - t)
        out["list"] = samples
        store.close()
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


GRAPH_TREE = textwrap.dedent(
    """
    import time
    import ikos

    DAEMONS, LAYERS, DELAY, CHAIN = {daemons}, {layers}, {delay}, {chain}

    class Worker(ikos.Actor):
        def __init__(self, delay=0.0):
            self.delay = delay

        def on_start(self):
            if self.delay:
                time.sleep(self.delay)  # initialisation that waits on I/O

        def receive(self, message):
            return message

    def tree():
        width = DAEMONS // LAYERS
        names = [[f"d{{k}}_{{i}}" for i in range(width)] for k in range(LAYERS)]
        children, previous = [], None
        for k in range(LAYERS):
            for i in range(width):
                requires = [names[k - 1][i], names[k - 1][(i + 1) % width]] if k else []
                after = [previous] if CHAIN and previous else []
                children.append(ikos.Child(names[k][i], Worker, kwargs={{"delay": DELAY}},
                                           requires=requires, after=after))
                previous = names[k][i]
        pool = ikos.Supervisor("pool", max_restarts=10, within=5, children=children)
        return ikos.Supervisor("root", max_restarts=10, within=5, children=[pool])
    """
)


def time_pool_start(daemons: int, layers: int, delay: float, chain: bool, runs: int) -> float:
    """Median seconds of ``start pool`` (after a stop) for one variant of the graph."""
    from ikos.platform._control import ControlClient
    from ikos.platform._paths import InstancePaths

    directory = Path(tempfile.mkdtemp(prefix="ikos-bench-waves-"))
    tree = GRAPH_TREE.format(daemons=daemons, layers=layers, delay=delay, chain=chain)
    (directory / "graphtree.py").write_text(tree)
    root = directory / "root"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ikos.manager._ikosd",
            "--root",
            str(root),
            "--tree",
            f"{directory / 'graphtree.py'}:tree",
            "--metrics",
            "off",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"ikosd did not start: {line!r}")
        samples = []
        with ControlClient(InstancePaths.for_root(root), timeout=600) as client:
            for _ in range(runs):
                client.call("stop", {"name": "pool"})
                t = time.perf_counter()
                client.call("start", {"name": "pool"})
                samples.append(time.perf_counter() - t)
                running = [s for s in client.call("list") if s["state"] == "running"]
                if len(running) != daemons + 2:
                    raise RuntimeError(f"{len(running)} running after the start, not {daemons + 2}")
        return sorted(samples)[len(samples) // 2]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)


def waves_table(daemons: int, layers: int, runs: int) -> Table:
    table = Table(
        f"Start-up of a {daemons}-daemon dependency graph: waves against sequence",
        ["on_start of each actor", "in waves (s)", "in sequence (s)", "sequence / waves"],
    )
    raw: dict[str, Any] = {}
    for delay in (0.0, 0.05):
        waves = time_pool_start(daemons, layers, delay, chain=False, runs=runs)
        sequence = time_pool_start(daemons, layers, delay, chain=True, runs=runs)
        label = "returns at once" if delay == 0 else f"takes {delay * 1000:g} ms"
        table.add(label, waves, sequence, sequence / waves)
        raw[f"delay_{delay}"] = {"waves_s": waves, "sequence_s": sequence}
    table.notes += [
        f"{layers} layers of {daemons // layers} actors under one supervisor, each actor"
        " requiring two of the layer below: "
        f"{layers} waves. The sequence is the same tree plus an `after` chain through the"
        " daemons in start order (one daemon per wave), run by the same ikosd.",
        f"`ikosctl start pool` to its answer (every daemon ready), median of {runs}, each"
        " after a stop of the pool.",
        "Load average (1, 5, 15 min) when the run ended: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        + f" on {os.cpu_count()} CPUs.",
    ]
    table.raw = raw
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=N_SERVICES)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--daemons", type=int, default=200)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-waves", action="store_true", help="only the registry's figures")
    parser.add_argument("--skip-registry", action="store_true", help="only the start-up figures")
    args = parser.parse_args(argv)
    if not args.skip_registry:
        registry_figures(args.services, args.queries)
    if not args.skip_waves:
        table = waves_table(args.daemons, args.layers, args.runs)
        path = table.write("startup_waves")
        print(table.markdown())
        print(f"written to {path}")
        # The figures in one place: the registry's results file holds both tables.
        registry_md = RESULTS / "registry.md"
        if registry_md.exists():
            text = registry_md.read_text().split("\n## Start-up of a")[0].rstrip("\n")
            registry_md.write_text(text + "\n\n" + table.markdown())
    return 0


def registry_figures(total: int, n: int) -> None:

    inst = IkosInstance(EMPTY_TREE, "ikos-bench-registry-")
    try:
        seq_rate = register_sequentially(inst.root, total)
        reads = read_from_another_process(inst.root, n, total)
        par_rate = register_concurrently(inst.root, WRITERS, PER_WRITER)
    finally:
        inst.close()
    floor = in_process_floor(total, n)

    def us(samples: list[float], q: float) -> float:
        return percentile(samples, q) * 1e6

    table = Table(
        f"Service registry: {total:,} services in ikosd",
        ["metric", "ikos (another process, control socket)", "floor", "ikos / floor"],
    )
    hello50, hello99 = us(reads["hello"], 50), us(reads["hello"], 99)
    table.add("control-socket round trip p50 (`hello`), µs", hello50, "-", "-")
    table.add("control-socket round trip p99 (`hello`), µs", hello99, "-", "-")
    for key, label in (
        ("name", "discover by exact name"),
        ("pattern", f"discover by glob (`svc/NNNN*`, {reads['pattern_n']} results)"),
        ("capability", f"discover by capability ({reads['capability_n']} results)"),
    ):
        for q in (50, 99):
            ikos_us, floor_us = us(reads[key], q), us(floor[key], q)
            table.add(f"{label} p{q}, µs", ikos_us, floor_us, ikos_us / floor_us)
    list_ms, floor_list_ms = us(reads["list"], 50) / 1000, us(floor["list"], 50) / 1000
    table.add(
        f"list all {reads['list_n']:,} services (`services`), median ms",
        list_ms,
        floor_list_ms,
        list_ms / floor_list_ms,
    )
    table.add(
        "register, one client, services/s (each acknowledged after its commit)",
        seq_rate,
        floor["register_per_s"],
        seq_rate / floor["register_per_s"],
    )
    table.add(f"register, {WRITERS} clients at once, services/s (group commit)", par_rate, "-", "-")
    table.notes += [
        "floor: the same query on a RegistryStore in-process (SQLite, no IPC), and for"
        " register one commit per registration; the `hello` rows are the control socket's"
        " own cost, the floor of any request.",
        "Latencies are measured by a separate process through ikos's ControlClient (JSON"
        " Lines over the Unix socket), as a user's program would see them.",
        f"The concurrent row adds {WRITERS * PER_WRITER:,} services to the {total:,}.",
        "No registry peer (Consul, etcd) is installed here; none is compared.",
        "Load average (1, 5, 15 min) when the run ended: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        + f" on {os.cpu_count()} CPUs: p99 figures mostly measure the machine's other work.",
    ]
    table.raw = {"reads": reads, "floor": floor, "register_seq": seq_rate, "register_par": par_rate}
    path = table.write("registry")
    print(table.markdown())
    print(f"written to {path}")


if __name__ == "__main__":
    raise SystemExit(main())
