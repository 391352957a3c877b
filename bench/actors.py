"""Actor benchmark: ikos against the raw floor and against Ray, Thespian and Pykka.

Run with ``make bench`` (or ``python -m bench.actors``). Measures, in one run:
ask round trip p50/p99 to an actor in another process, tell throughput,
time to start 100 actors to ready, time from SIGKILL of an actor to its
answering again (no back-off), how late an ``AskTimeout`` comes past its
timeout and how soon an ask to a stopped actor fails (where the tests only
bound hangs), USS per idle actor and the manager's idle CPU with 100
actors. The floor is a ``multiprocessing.Pipe`` round trip to a process
that echoes. Peers that are not installed are skipped (``pip install -e
'.[bench]'`` installs them).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

from bench._common import IkosInstance, Table, percentile, summary_us

MSG = {"op": "echo", "n": 1, "payload": "x" * 32}
ASK_TIMEOUT = 0.05  # the timeout whose lateness is measured

TREE = textwrap.dedent(
    """
    import os
    import time
    import ikos

    class Echo(ikos.Actor):
        def receive(self, message):
            return message

        def echo(self, message):  # the same, as a method for proxies
            return message

    class Sink(ikos.Actor):
        def on_start(self):
            self.count = 0

        def receive(self, message):
            if message == "count?":
                return self.count
            self.count += 1

    class Mute(ikos.Actor):
        def receive(self, message):
            if message == "block":
                time.sleep(3600)  # never answers again
            return message

    def tree():
        return ikos.Supervisor("root", max_restarts=100000, within=1, children=[
            ikos.Child("echo", Echo),
            ikos.Child("sink", Sink, mailbox_size=100000),
            ikos.Child("mute", Mute, shutdown="brutal_kill"),
            ikos.Supervisor("pool", max_restarts=100, within=1, children=[
                ikos.Child(f"w{i}", Echo) for i in range(100)
            ]),
        ])
    """
)


# -- the floor -------------------------------------------------------------------


def _pipe_echo(conn: Any) -> None:
    while True:
        m = conn.recv()
        if m is None:
            return
        conn.send(m)


def _pipe_sink(conn: Any, n: int) -> None:
    for _ in range(n):
        conn.recv()
    conn.send("done")


def interleaved_ask(root: Path, n: int, blocks: int = 20) -> tuple[list[float], list[float]]:
    """Round trips to the floor and to an ikos actor, alternating in blocks.

    This machine is shared and noisy: measuring the two one after the other
    would compare two different moments; alternating small blocks exposes
    both to the same noise, so their ratio means something.
    """
    import ikos

    a, b = mp.Pipe()
    p = mp.Process(target=_pipe_echo, args=(b,))
    p.start()
    echo = ikos.ActorRef("echo", root=root)
    for _ in range(500):
        a.send(MSG)
        a.recv()
        echo.ask(MSG)
    floor: list[float] = []
    ik: list[float] = []
    per = max(1, n // blocks)
    for _ in range(blocks):
        for _ in range(per):
            t = time.perf_counter()
            a.send(MSG)
            a.recv()
            floor.append(time.perf_counter() - t)
        for _ in range(per):
            t = time.perf_counter()
            echo.ask(MSG)
            ik.append(time.perf_counter() - t)
    a.send(None)
    p.join()
    return floor, ik


def floor_tell(n: int) -> float:
    a, b = mp.Pipe()
    p = mp.Process(target=_pipe_sink, args=(b, n))
    p.start()
    t = time.perf_counter()
    for _ in range(n):
        a.send(MSG)
    a.recv()
    elapsed = time.perf_counter() - t
    p.join()
    return n / elapsed


# -- proxies and futures ---------------------------------------------------------------


def proxy_and_ask(root: Path, n: int, blocks: int = 20) -> tuple[list[float], list[float]]:
    """Round trips of ``ref.proxy().echo(MSG)`` and ``ref.ask(MSG)``, in alternate blocks."""
    import ikos

    ref = ikos.ActorRef("echo", root=root)
    echo = ref.proxy().echo
    for _ in range(500):
        ref.ask(MSG)
        echo(MSG)
    plain: list[float] = []
    proxied: list[float] = []
    per = max(1, n // blocks)
    for _ in range(blocks):
        for _ in range(per):
            t = time.perf_counter()
            ref.ask(MSG)
            plain.append(time.perf_counter() - t)
        for _ in range(per):
            t = time.perf_counter()
            echo(MSG)
            proxied.append(time.perf_counter() - t)
    return plain, proxied


def pipelined(root: Path, n: int, rounds: int = 5) -> dict[str, float]:
    """Asks per second from one client: sequential ``ask``, ``n`` ``ask_future`` in flight,
    and ``n`` ``ask_async`` gathered on one loop; the best of ``rounds`` alternating rounds."""
    import asyncio
    import concurrent.futures

    import ikos

    ref = ikos.ActorRef("echo", root=root)

    def sequential() -> float:
        t = time.perf_counter()
        for _ in range(n):
            ref.ask(MSG)
        return n / (time.perf_counter() - t)

    def futures() -> float:
        t = time.perf_counter()
        fs = [ref.ask_future(MSG, timeout=120) for _ in range(n)]
        concurrent.futures.wait(fs)
        assert all(f.result() == MSG for f in fs)
        return n / (time.perf_counter() - t)

    async def gathered() -> float:
        await ref.ask_async(MSG)
        t = time.perf_counter()
        got = await asyncio.gather(*(ref.ask_async(MSG, timeout=120) for _ in range(n)))
        assert len(got) == n
        return n / (time.perf_counter() - t)

    futures()  # the pipelined connection and its thread exist before the clock starts
    best = {"sequential": 0.0, "futures": 0.0, "asyncio": 0.0}
    for _ in range(rounds):
        best["sequential"] = max(best["sequential"], sequential())
        best["futures"] = max(best["futures"], futures())
        best["asyncio"] = max(best["asyncio"], asyncio.run(gathered()))
    return best


# -- many clients at once ------------------------------------------------------------

CLIENTS = 8  # client processes asking at once


def _floor_pair_client(conn: Any, go: Any, stop_at: Any, out: Any) -> None:
    out.put("ready")
    go.wait()
    end = stop_at.value
    count = 0
    while time.monotonic() < end:
        conn.send(MSG)
        conn.recv()
        count += 1
    conn.send(None)
    out.put(count)


def _ikos_client(root: str, name: str, go: Any, stop_at: Any, out: Any) -> None:
    import ikos

    ref = ikos.ActorRef(name, root=root)
    ref.ask(MSG)  # connected and authenticated before the clock starts
    out.put("ready")
    go.wait()
    end = stop_at.value
    count = 0
    while time.monotonic() < end:
        ref.ask(MSG)
        count += 1
    out.put(count)


def _run_clients(procs: list[Any], go: Any, stop_at: Any, out: Any, seconds: float) -> float:
    """Start the client processes, let them ask for ``seconds`` together; asks per second."""
    for p in procs:
        p.start()
    for _ in procs:  # every client forked and connected (each then waits on ``go``)
        assert out.get(timeout=60) == "ready"
    stop_at.value = time.monotonic() + seconds
    go.set()
    total = sum(out.get(timeout=seconds + 60) for _ in range(CLIENTS))
    for p in procs:
        p.join()
    return total / seconds


def concurrent_asks(root: Path, seconds: float) -> dict[str, float]:
    """Asks per second from CLIENTS processes at once: to one actor, to one actor each,
    and the floor (CLIENTS Pipe pairs, each client with its own echo process)."""
    ctx = mp.get_context("fork")
    out: dict[str, float] = {}
    for label in ("floor", "one actor", "one actor each"):
        go, stop_at, results = ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
        procs: list[Any] = []
        if label == "floor":
            for _ in range(CLIENTS):
                a, b = ctx.Pipe()
                procs.append(ctx.Process(target=_pipe_echo, args=(b,)))
                procs.append(ctx.Process(target=_floor_pair_client, args=(a, go, stop_at, results)))
            for p in procs[::2]:
                p.start()
            rate = _run_clients(procs[1::2], go, stop_at, results, seconds)
            for p in procs[::2]:
                p.join()
        else:
            for i in range(CLIENTS):
                name = "echo" if label == "one actor" else f"w{i}"
                args = (str(root), name, go, stop_at, results)
                procs.append(ctx.Process(target=_ikos_client, args=args))
            rate = _run_clients(procs, go, stop_at, results, seconds)
        out[label] = rate
    return out


# -- ikos -------------------------------------------------------------------------


def failed_asks(root: Path, client: Any, timeouts: int, dead: int) -> dict[str, list[float]]:
    """How late ``AskTimeout`` comes past its timeout; how soon a stopped actor's ask fails.

    ``mute`` answers once (so that the ref is connected), then never again:
    every later ask times out. Then it is stopped, and fresh refs ask it.
    """
    import ikos

    mute = ikos.ActorRef("mute", root=root)
    mute.ask("hello")
    mute.tell("block")
    late = []
    for _ in range(timeouts):
        t = time.perf_counter()
        try:
            mute.ask(MSG, timeout=ASK_TIMEOUT)
        except ikos.AskTimeout:
            late.append(time.perf_counter() - t - ASK_TIMEOUT)
    client.call("stop", {"name": "mute"})
    refused = []
    for _ in range(dead):
        t = time.perf_counter()
        try:
            ikos.ActorRef("mute", root=root).ask(MSG, timeout=5)
        except ikos.ActorDeadError:
            refused.append(time.perf_counter() - t)
    return {"ask_timeout_late": late, "dead_ask": refused}


def ikos_figures(
    inst: IkosInstance, n: int, tells: int, kills: int, timeouts: int
) -> dict[str, Any]:
    import ikos
    from ikos.platform._control import ControlClient
    from ikos.platform._paths import InstancePaths

    out: dict[str, Any] = {}
    echo = ikos.ActorRef("echo", root=inst.root)
    out["floor_ask"], out["ask"] = interleaved_ask(inst.root, n)
    out["concurrent"] = concurrent_asks(inst.root, seconds=3.0)
    out["proxy_plain"], out["proxy"] = proxy_and_ask(inst.root, n)
    out["pipelined"] = pipelined(inst.root, 10000)

    sink = ikos.ActorRef("sink", root=inst.root)
    sink.ask("count?")
    before = sink.ask("count?")
    t = time.perf_counter()
    for _ in range(tells):
        sink.tell(MSG)
    got = sink.ask("count?", timeout=120)
    out["tell_per_s"] = tells / (time.perf_counter() - t)
    assert got - before == tells, (got, before)

    client = ControlClient(InstancePaths.for_root(inst.root), timeout=300)
    client.call("stop", {"name": "pool"})
    t = time.perf_counter()
    client.call("start", {"name": "pool"})
    out["start_100_s"] = time.perf_counter() - t

    restarts = []
    for _ in range(kills):
        pid = client.call("status", {"names": ["echo"]})[0]["pid"]
        t = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while True:
            try:
                echo.ask(MSG, timeout=5)
                break
            except ikos.ActorDeadError:
                continue
        restarts.append(time.perf_counter() - t)
        time.sleep(0.05)
    out["restart"] = restarts
    out.update(failed_asks(inst.root, client, timeouts, dead=1000))

    statuses = client.call("status", {"names": [f"w{i}" for i in range(100)]})
    uss = [psutil.Process(s["pid"]).memory_full_info().uss for s in statuses]
    out["uss_per_actor"] = sum(uss) / len(uss)
    manager = psutil.Process(inst.proc.pid)
    out["manager_uss"] = manager.memory_full_info().uss
    c0 = manager.cpu_times()
    time.sleep(5)
    c1 = manager.cpu_times()
    out["manager_idle_cpu_pct"] = ((c1.user - c0.user) + (c1.system - c0.system)) / 5 * 100
    client.close()
    return out


# -- peers --------------------------------------------------------------------------


def ray_figures(n: int, kills: int) -> dict[str, Any] | None:
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)

    @ray.remote(max_restarts=-1)
    class Echo:
        def echo(self, m: Any) -> Any:
            return m

        def pid(self) -> int:
            return os.getpid()

    out: dict[str, Any] = {}
    a = Echo.remote()
    for _ in range(200):
        ray.get(a.echo.remote(MSG))
    samples = []
    for _ in range(min(n, 3000)):
        t = time.perf_counter()
        ray.get(a.echo.remote(MSG))
        samples.append(time.perf_counter() - t)
    out["ask"] = samples
    t = time.perf_counter()
    actors = [Echo.remote() for _ in range(100)]
    ray.get([x.pid.remote() for x in actors])
    out["start_100_s"] = time.perf_counter() - t
    pids = ray.get([x.pid.remote() for x in actors])
    out["uss_per_actor"] = sum(psutil.Process(p).memory_full_info().uss for p in pids) / 100
    for x in actors:
        ray.kill(x)
    restarts = []
    for _ in range(min(kills, 5)):
        pid = ray.get(a.pid.remote())
        t = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while True:
            try:
                ray.get(a.echo.remote(MSG), timeout=30)
                break
            except Exception:
                continue
        restarts.append(time.perf_counter() - t)
    out["restart"] = restarts
    ray.shutdown()
    return out


def thespian_figures(n: int) -> dict[str, Any] | None:
    try:
        from thespian.actors import Actor, ActorSystem
    except ImportError:
        return None

    out: dict[str, Any] = {}
    system = ActorSystem("multiprocTCPBase")
    try:
        a = system.createActor(ThespianEcho)
        for _ in range(100):
            system.ask(a, MSG, 5)
        samples = []
        for _ in range(min(n, 2000)):
            t = time.perf_counter()
            system.ask(a, MSG, 5)
            samples.append(time.perf_counter() - t)
        out["ask"] = samples
        t = time.perf_counter()
        actors = [system.createActor(ThespianEcho) for _ in range(100)]
        pids = [system.ask(x, "pid", 10) for x in actors]
        out["start_100_s"] = time.perf_counter() - t
        out["uss_per_actor"] = sum(
            psutil.Process(p).memory_full_info().uss for p in pids if p
        ) / max(1, len([p for p in pids if p]))
    finally:
        system.shutdown()
    _ = Actor
    return out


try:
    from thespian.actors import Actor as _ThespianActor

    class ThespianEcho(_ThespianActor):  # type: ignore[misc]
        def receiveMessage(self, message: Any, sender: Any) -> None:
            if message == "pid":
                self.send(sender, os.getpid())
            elif isinstance(message, dict):
                self.send(sender, message)

except ImportError:  # pragma: no cover - optional peer
    pass


def pykka_figures(n: int) -> dict[str, Any] | None:
    try:
        import pykka
    except ImportError:
        return None

    class Echo(pykka.ThreadingActor):  # type: ignore[misc]
        def on_receive(self, message: Any) -> Any:
            return message

    out: dict[str, Any] = {}
    ref = Echo.start()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        ref.ask(MSG)
        samples.append(time.perf_counter() - t)
    out["ask"] = samples
    t = time.perf_counter()
    refs = [Echo.start() for _ in range(100)]
    for r in refs:
        r.ask("x")
    out["start_100_s"] = time.perf_counter() - t
    pykka.ActorRegistry.stop_all()
    return out


# -- report ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="asks per measurement")
    ap.add_argument("--tells", type=int, default=100000)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--timeouts", type=int, default=100, help="asks left to time out")
    ap.add_argument("--upgrades", type=int, default=20, help="hot code upgrades under asks")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args(argv)

    print("floor: multiprocessing.Pipe ...", flush=True)
    fl_tell = floor_tell(args.tells)
    print("ikos ...", flush=True)
    inst = IkosInstance(TREE)
    try:
        ik = ikos_figures(inst, args.n, args.tells, args.kills, args.timeouts)
    finally:
        inst.close()
    print("ikos upgrades ...", flush=True)
    from bench.upgrade import upgrade_gaps

    upgrades = upgrade_gaps(args.upgrades)
    peers: dict[str, dict[str, Any] | None] = {}
    if not args.no_peers:
        for name, fn in (
            ("Ray", lambda: ray_figures(args.n, args.kills)),
            ("Thespian", lambda: thespian_figures(args.n)),
            ("Pykka (threads)", lambda: pykka_figures(args.n)),
        ):
            print(f"{name} ...", flush=True)
            try:
                peers[name] = fn()
            except Exception as exc:  # a peer failing must not lose ikos's figures
                print(f"  {name} failed: {exc!r}", flush=True)
                peers[name] = None

    fa, ia = summary_us(ik.pop("floor_ask")), summary_us(ik["ask"])
    names = [n for n, v in peers.items() if v]
    table = Table(
        "Actors: ikos against the floor and its peers",
        ["metric", "floor (mp.Pipe)", "ikos", "ikos / floor", *names],
    )

    def peer(key: str, f: Any) -> list[Any]:
        row = []
        for n in names:
            v = peers[n]
            row.append(f(v[key]) if v and key in v else "-")
        return row

    table.add(
        "ask p50 (µs)",
        fa["p50_us"],
        ia["p50_us"],
        ia["p50_us"] / fa["p50_us"],
        *peer("ask", lambda s: summary_us(s)["p50_us"]),
    )
    table.add(
        "ask p99 (µs)",
        fa["p99_us"],
        ia["p99_us"],
        ia["p99_us"] / fa["p99_us"],
        *peer("ask", lambda s: summary_us(s)["p99_us"]),
    )
    conc = ik.pop("concurrent")
    pp, px = summary_us(ik.pop("proxy_plain")), summary_us(ik.pop("proxy"))
    table.add(
        "proxy call p50 (µs; ratio: to a plain ask in the same run)",
        pp["p50_us"],
        px["p50_us"],
        px["p50_us"] / pp["p50_us"],
        *["-" for _ in names],
    )
    pipe = ik.pop("pipelined")
    for label, key in (("ask_future", "futures"), ("ask_async, gathered", "asyncio")):
        table.add(
            f"asks/s from one client, 10,000 in flight by {label} (ratio: to sequential ask)",
            pipe["sequential"],
            pipe[key],
            pipe[key] / pipe["sequential"],
            *["-" for _ in names],
        )
    for label in ("one actor", "one actor each"):
        table.add(
            f"asks/s from {CLIENTS} client processes to {label}",
            conc["floor"],
            conc[label],
            conc[label] / conc["floor"],
            *["-" for _ in names],
        )
    table.add(
        "tell throughput (msg/s)",
        fl_tell,
        ik["tell_per_s"],
        ik["tell_per_s"] / fl_tell,
        *peer("tell_per_s", lambda v: v),
    )
    table.add(
        "start 100 actors to ready (s)",
        "-",
        ik["start_100_s"],
        "-",
        *peer("start_100_s", lambda v: v),
    )
    med = percentile(ik["restart"], 50) * 1e3
    table.add(
        "SIGKILL to answering again, median (ms)",
        "-",
        med,
        "-",
        *peer("restart", lambda s: percentile(s, 50) * 1e3),
    )
    table.add(
        "SIGKILL to answering again, p99 (ms)",
        "-",
        percentile(ik["restart"], 99) * 1e3,
        "-",
        *peer("restart", lambda s: percentile(s, 99) * 1e3),
    )
    for label, key, unit, scale in (
        (f"AskTimeout, late past its {ASK_TIMEOUT * 1e3:g} ms", "ask_timeout_late", "ms", 1e3),
        ("ask to a stopped actor to ActorDeadError", "dead_ask", "µs", 1e6),
    ):
        for q in (50, 99):
            table.add(
                f"{label}: p{q} ({unit})",
                "-",
                percentile(ik[key], q) * scale,
                "-",
                *["-" for _ in names],
            )
    gaps_ms = [g * 1e3 for g in upgrades["gaps"]]
    for label, value in (
        ("median", percentile(gaps_ms, 50)),
        ("max", max(gaps_ms)),
    ):
        table.add(
            f"gap in service during a hot upgrade, {label} (ms)",
            "-",
            value,
            "-",
            *["-" for _ in names],
        )
    table.add(
        f"messages lost or reordered in {len(gaps_ms)} upgrades",
        "-",
        f"{len(upgrades['errors'])} of {upgrades['replies']}",
        "-",
        *["-" for _ in names],
    )
    table.add(
        "USS per idle actor (KiB)",
        "-",
        ik["uss_per_actor"] / 1024,
        "-",
        *peer("uss_per_actor", lambda v: v / 1024),
    )
    table.add(
        "manager USS with 102 actors (MiB)",
        "-",
        ik["manager_uss"] / 2**20,
        "-",
        *["-" for _ in names],
    )
    table.add(
        "manager idle CPU with 102 actors (%)",
        "-",
        ik["manager_idle_cpu_pct"],
        "-",
        *["-" for _ in names],
    )
    table.notes.append(
        "ask: a small dict to an actor in another process, answered by return value."
    )
    table.notes.append(
        "Proxy and pipelined rows: the floor column holds ikos's own plain ask (p50) or"
        " sequential ask rate, measured in the same run; the ratio is to that."
    )
    table.notes.append(
        f"asks/s from {CLIENTS} clients: each client process asks in a loop for 3 s; the floor"
        f" is {CLIENTS} Pipe pairs (each client with its own echo process) on the same cores."
    )
    table.notes.append(
        "Pykka runs actors as threads of the caller's process (no process boundary)."
    )
    table.notes.append("Ray restarts are measured on a max_restarts=-1 actor killed with SIGKILL.")
    table.notes.append(
        "AskTimeout: asks to an actor that never answers; ActorDeadError: fresh refs asking an"
        " actor stopped with brutal_kill. tests/test_mailbox.py only bounds both against hangs."
    )
    table.raw = {
        "floor": {"ask": fa, "tell_per_s": fl_tell},
        "concurrent_asks_per_s": conc,
        "proxy": {"plain_ask": pp, "proxy": px},
        "pipelined_asks_per_s": pipe,
        "upgrade": {
            "gaps_ms": gaps_ms,
            "replies": upgrades["replies"],
            "errors": upgrades["errors"],
        },
        "ikos": {k: (summary_us(v) if isinstance(v, list) else v) for k, v in ik.items()},
        "peers": {
            n: {k: (summary_us(v) if k in ("ask", "restart") else v) for k, v in (p or {}).items()}
            for n, p in peers.items()
        },
    }
    path = table.write("actors")
    print(table.markdown())
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
