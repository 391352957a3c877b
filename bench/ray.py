"""Ray placement benchmark: ikos actors on a Ray cluster against plain Ray, in one run.

Run with ``python -m bench.ray`` (needs ``pip install -e '.[ray]'``). One
``ray.cluster_utils.Cluster`` on this machine: a head and two worker nodes
(three raylets), each offering a zone resource, two of them ``movable``.
Measured side by side on that cluster:

- the ask round trip to a Ray-placed ikos actor (``ikos.ActorRef.ask``) and
  the method call of a plain Ray actor on the same node (``ray.get(a.m.remote())``),
  p50 and p99; the goal is ikos within 1.2x of Ray's own;
- the time from a node's loss (``Cluster.remove_node``) to its actor answering
  from the surviving node: ikos's supervisor restarting it versus Ray's own
  restart (``max_restarts=-1``);
- starting N actors (200 when the machine has the memory; one Ray worker
  process each) spread over the three nodes by their zone resources: ikosd's
  tree to its ready line, versus creating the Ray actors and waiting for each
  to answer.

Results go to ``bench/results/ray.md`` and ``ray.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

import ikos
from bench._common import IkosInstance, Table, summary_us

REPO = Path(__file__).resolve().parent.parent
MSG = {"op": "echo", "n": 1, "payload": "x" * 32}
STORE = 80 * 1024 * 1024
ZONES = ("zone_h", "zone_a", "zone_b")


class Ping(ikos.Actor):
    """Answers every message with itself (imported by path in the Ray workers)."""

    def receive(self, message: Any) -> Any:
        return message


def plain_ping_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class PlainPing:
        def ping(self, message: Any) -> Any:
            return message

        def node(self) -> str:
            return str(ray.get_runtime_context().get_node_id())

    return PlainPing


def start_cluster() -> tuple[Any, list[Any]]:
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = str(REPO)  # the workers import bench.ray:Ping
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": STORE,
            "include_dashboard": False,
            "resources": {"zone_h": 1000},
        },
    )
    workers = [add_node(cluster, {"zone_a": 1000, "movable": 1}),
               add_node(cluster, {"zone_b": 1000, "movable": 1})]  # fmt: skip
    cluster.wait_for_nodes()
    return cluster, workers


def add_node(cluster: Any, resources: dict[str, float]) -> Any:
    return cluster.add_node(num_cpus=1, object_store_memory=STORE, resources=resources)


def ikosd(address: str, children: str) -> IkosInstance:
    tree = textwrap.dedent(
        """
        import ikos
        tree = ikos.Supervisor("root", max_restarts=100, within=60, children=[{children}])
        """
    ).format(children=children)
    return IkosInstance(tree, "ikos-bench-ray-", config=f'[ray]\naddress = "{address}"\n')


def timed(call: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def bench_ask(address: str, n: int, table: Table) -> None:
    import ray

    inst = ikosd(address, 'ikos.Child("ping", "bench.ray:Ping", placement=ikos.Ray({"zone_a": 1}))')
    try:
        ref = ikos.ActorRef("ping", root=inst.root)
        plain = plain_ping_class().options(resources={"zone_a": 1}).remote()
        ray.get(plain.ping.remote(MSG))
        ref.ask(MSG, timeout=60)
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(10):  # interleaved blocks: both see the same noise
            ours += timed(lambda: ref.ask(MSG, timeout=60), n // 10)
            theirs += timed(lambda: ray.get(plain.ping.remote(MSG)), n // 10)
        ray.kill(plain)
    finally:
        inst.close()
    a, b = summary_us(ours), summary_us(theirs)
    table.add("ask p50 (µs)", a["p50_us"], b["p50_us"], a["p50_us"] / b["p50_us"])
    table.add("ask p99 (µs)", a["p99_us"], b["p99_us"], a["p99_us"] / b["p99_us"])
    table.raw["ask"] = {"ikos": a, "ray": b, "n": n}


def answering(call: Any, deadline: float) -> float:
    """Poll ``call`` until it answers; the time it first did."""
    while time.monotonic() < deadline:
        try:
            call()
            return time.monotonic()
        except Exception:
            time.sleep(0.01)
    raise TimeoutError("no answer after the node loss")


def node_of(workers: list[Any], node_id: str) -> Any:
    return next(w for w in workers if w.node_id == node_id)


def bench_node_loss(cluster: Any, workers: list[Any], rounds: int, table: Table) -> None:
    import ray

    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(rounds):
        inst = ikosd(
            cluster.address,
            'ikos.Child("mover", "bench.ray:Ping", placement=ikos.Ray({"movable": 0.01}))',
        )
        try:
            ref = ikos.ActorRef("mover", root=inst.root)
            where = subprocess.run(
                [sys.executable, "-m", "ikos.cli._ikosctl", "--root", str(inst.root), "--json",
                 "status", "mover"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            node_id = re.search(r'"node_id": "([0-9a-f]+)"', where)
            assert node_id is not None
            lost = node_of(workers, node_id.group(1))
            t0 = time.monotonic()
            cluster.remove_node(lost)
            ours.append(answering(lambda ref=ref: ref.ask(MSG, timeout=2), t0 + 120) - t0)
        finally:
            inst.close()
        workers.remove(lost)
        workers.append(add_node(cluster, {"movable": 1}))
        cluster.wait_for_nodes()
        # plain Ray, its own restarts
        actor = (
            plain_ping_class()
            .options(resources={"movable": 0.01}, max_restarts=-1, max_task_retries=0)
            .remote()
        )
        ray.get(actor.ping.remote(MSG))
        node = ray.get(actor.node.remote())
        lost = node_of(workers, node)
        t0 = time.monotonic()
        cluster.remove_node(lost)

        def call(actor: Any = actor) -> Any:
            return ray.get(actor.ping.remote(MSG), timeout=2)

        theirs.append(answering(call, t0 + 120) - t0)
        ray.kill(actor)
        workers.remove(lost)
        workers.append(add_node(cluster, {"movable": 1}))
        cluster.wait_for_nodes()
    med = sorted(ours)[len(ours) // 2], sorted(theirs)[len(theirs) // 2]
    table.add("node loss to answering on another node, median (ms)", med[0] * 1e3, med[1] * 1e3,
              med[0] / med[1])  # fmt: skip
    table.raw["node_loss_s"] = {"ikos": ours, "ray": theirs}


def bench_start_many(address: str, n: int, table: Table) -> None:
    import ray

    children = ",".join(
        f'ikos.Child("p{i}", "bench.ray:Ping", start_timeout=600, '
        f'placement=ikos.Ray({{"{ZONES[i % 3]}": 1}}))'
        for i in range(n)
    )
    t0 = time.monotonic()
    inst = ikosd(address, children)
    ours = time.monotonic() - t0
    for i in range(n):  # every one answers (the ready line says they all started)
        ikos.ActorRef(f"p{i}", root=inst.root).ask(MSG, timeout=60)
    t1 = time.monotonic()
    inst.close()
    stop = time.monotonic() - t1
    cls = plain_ping_class()
    t0 = time.monotonic()
    actors = [cls.options(resources={ZONES[i % 3]: 1}).remote() for i in range(n)]
    ray.get([a.ping.remote(MSG) for a in actors], timeout=600)
    theirs = time.monotonic() - t0
    for a in actors:
        ray.kill(a)
    table.add(f"start {n} actors over 3 nodes to answering (s)", ours, theirs, ours / theirs)
    table.add(f"orderly stop of {n} Ray-placed ikos actors (s)", stop, "-", "-")
    table.raw["start_many"] = {"n": n, "ikos_s": ours, "ray_s": theirs, "ikos_stop_s": stop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--actors", type=int, default=200)
    args = parser.parse_args()
    try:
        import ray
    except ImportError:
        print("bench.ray: skipped, Ray is not installed (pip install -e '.[ray]')")
        return

    # one Ray worker process per actor, ~40 MB unique each (twice that of margin): fewer
    # when memory is short, as the table then says
    room = psutil.virtual_memory().available // (80 * 1024 * 1024)
    n = min(args.actors, max(int(room), 10))
    table = Table(
        "Ray placement: ikos actors on a Ray cluster against plain Ray",
        ["metric", "ikos on Ray", "plain Ray", "ikos / Ray"],
    )
    cluster, workers = start_cluster()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        bench_ask(cluster.address, args.asks, table)
        bench_start_many(cluster.address, n, table)
        bench_node_loss(cluster, workers, args.rounds, table)
    finally:
        ray.shutdown()
        cluster.shutdown()
    table.notes += [
        "One machine (2 cores, shared with other work), three Ray nodes (head + 2 workers, "
        "each a raylet) from ray.cluster_utils.Cluster; Ray "
        f"{ray.__version__}.",
        "ask: a small dict to an actor on a worker node, from this process (a Ray driver): "
        "ikos.ActorRef.ask (registry lookup once, then a Ray actor call returning "
        "(ok, value)) against ray.get(actor.method.remote(msg)).",
        "node loss: Cluster.remove_node of the node the actor runs on, until it answers from "
        "the other movable node; ikos: its supervisor restarts it (max_restarts=0 in Ray); "
        "Ray: max_restarts=-1. Median of the rounds.",
        "start: ikosd with a tree of N placed children to its ready line (the Ray bridge's "
        "ray.init included) against creating N Ray actors and waiting for one reply each.",
    ]
    print(table.markdown())
    table.write("ray")


if __name__ == "__main__":
    main()
