"""Supervision subtrees on a real multi-node Ray cluster (issue 13, docs/scaling.md).

One ``ray.cluster_utils.Cluster`` for the module, on this machine: a head and
three worker nodes, each a raylet of its own, offering custom resources
(``zone_a``, ``zone_b``, and ``movable`` on the two nodes a moving actor may
use). Each test runs a real ikosd pointed at it by ``[ray] address`` and
checks, through ikosctl and ``ikos.ActorRef`` as a user would: placement by
resources, asks from this process and from a Ray task on another node, the
OTP strategies when a Ray worker process is killed and when a whole node
leaves, restart intensity escalating as locally, and an orderly shutdown
leaving no Ray actor behind. Skipped, with the reason, where Ray is not
installed (``pip install 'ikos[ray]'``; ``make test`` installs it where it can).
"""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import REPO, Instance, wait_for

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ikos[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils", reason="ray.cluster_utils is missing")

import ikos  # noqa: E402 (after the skip: nothing here runs without Ray)

pytestmark = pytest.mark.slow

#: A small object store per node: the machine has many agents and 2 cores.
STORE = 80 * 1024 * 1024
#: Generous: a Ray worker process starts in about a second, on a loaded machine in tens
#: (the children's start_timeout is as long: a slow start must not count as a failure).
TIMEOUT = 120.0


class Nodes:
    """The module's cluster, and its nodes by role."""

    def __init__(self, cluster: Any, a: Any, b: Any, c: Any) -> None:
        self.cluster, self.a, self.b, self.c = cluster, a, b, c

    @property
    def address(self) -> str:
        return str(self.cluster.address)


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    # The Ray workers import the actor classes (tests/ray_actors.py) by path: they
    # inherit the environment of the raylets this process starts.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": STORE, "include_dashboard": False},
    )
    try:
        a = cluster.add_node(num_cpus=1, object_store_memory=STORE, resources={"zone_a": 1})
        b = cluster.add_node(
            num_cpus=1, object_store_memory=STORE, resources={"zone_b": 1, "movable": 1}
        )
        c = cluster.add_node(
            num_cpus=1, object_store_memory=STORE, resources={"zone_c": 1, "movable": 1}
        )
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield Nodes(cluster, a, b, c)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def start(factory: Callable[..., Instance], nodes: Nodes, tree: str) -> Instance:
    inst = factory(
        tree=tree,
        config=f'[ray]\naddress = "{nodes.address}"\n',
        env={"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])},
        wait_ready=False,
    )
    inst.wait_ready(TIMEOUT)
    return inst


def placed(inst: Instance) -> dict[str, dict[str, Any]]:
    """The status objects of the Ray-placed actors, by name."""
    return {s["name"]: s for s in inst.status() if s.get("placement") == "ray"}


def ikos_actors_on_ray() -> list[str]:
    """Names of the live Ray actors in ikos's namespace."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "ikos"]  # fmt: skip


def wait_running_on(inst: Instance, name: str, *, not_pid: int | None = None) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = inst.status(name)
        if st["state"] == "running" and st.get("node_id") and st["pid"] != not_pid:
            return st  # type: ignore[no-any-return]
        return None

    return wait_for(check, TIMEOUT, message=f"{name} to run on Ray (not pid {not_pid})")  # type: ignore[no-any-return]


TWO_ZONES = """
    import ikos
    from ray_actors import where
    tree = ikos.Supervisor("root", max_restarts=5, within=60, children=[
        ikos.Supervisor("pool", strategy="one_for_all", max_restarts=5, within=60, children=[
            where("wa", resources={"zone_a": 0.01}),
            where("wb", resources={"zone_b": 0.01}),
        ]),
    ])
"""


@ray.remote(num_cpus=0, resources={"zone_b": 0.01})
def ask_from_node_b(name: str) -> tuple[Any, str]:
    """A Ray task on node B that knows nothing of ikosd's files: the actor by name."""
    return ikos.ActorRef(name).ask("where", timeout=60), ray.get_runtime_context().get_node_id()


def test_placement_asks_order_and_orderly_shutdown(
    ikosd_factory: Callable[..., Instance], nodes: Nodes
) -> None:
    inst = start(ikosd_factory, nodes, TWO_ZONES)
    wa = wait_running_on(inst, "wa")
    wb = wait_running_on(inst, "wb")
    # placed by resources, on the node that offers them; status and tree show the node
    assert wa["node_id"] == nodes.a.node_id and wb["node_id"] == nodes.b.node_id
    assert wa["node"] and wa["supervisor"] == "pool"
    # both started at once, through one bridge: neither failed its first start
    assert wa["restarts"] == 0 and wb["restarts"] == 0
    rows = [line.split("\t") for line in inst.ctl("list", check=True).stdout.splitlines()]
    assert [r[-1] for r in rows if r[0] == "wa"] == [f"{wa['node']} {wa['node_id'][:8]}"]
    assert "Node" in inst.ctl("status", "wa", check=True).stdout
    assert "@" in inst.ctl("tree", check=True).stdout
    top = {r["name"]: r for r in json.loads(inst.ctl("--json", "top", "--once", check=True).stdout)}
    assert top["wa"]["node_id"] == nodes.a.node_id and "node" not in top["ikos-broker"]
    # from this process, through the instance's registry of placed actors
    ref = ikos.ActorRef("wa", root=inst.root)
    where = ref.ask("where", timeout=60)
    assert where == {"pid": wa["pid"], "node_id": nodes.a.node_id}
    assert ref.proxy(timeout=60).incr(5) == 5
    assert ref.ask_future(("echo", 1), timeout=60).result(60) == ("echo", 1)
    for i in range(300):  # per-sender order: tells then an ask, all in sequence
        ref.tell(("seq", i))
    assert ref.ask("seen", timeout=60) == list(range(300))
    # from a Ray task on another node (B), resolved through Ray's registry of names
    answer, ran_on = ray.get(ask_from_node_b.remote("wa"), timeout=TIMEOUT)
    assert ran_on == nodes.b.node_id and answer["node_id"] == nodes.a.node_id
    assert sorted(ikos_actors_on_ray()) == ["wa", "wb"]
    # metrics: each placed daemon's node, as a label of ikos_daemon_node_info
    url = re.search(r"metrics (http://\S+/metrics)", inst.log_text())
    assert url is not None
    text = urllib.request.urlopen(url.group(1), timeout=30).read().decode()
    assert f'ikos_daemon_node_info{{daemon="wa",supervisor="pool",node="{wa["node"]}"}} 1' in text
    # orderly shutdown: stopped in reverse order, and no Ray actor of ikos's is left
    inst.ctl("shutdown", check=True)
    assert inst.proc.wait(TIMEOUT) == 0
    log = inst.log_text()
    assert log.index("actor wb: running -> stopping") < log.index("actor wa: running -> stopping")
    wait_for(lambda: not ikos_actors_on_ray(), TIMEOUT, message="no ikos actor left on Ray")
    assert not (inst.root / "run" / "ikos" / "actors" / "wa.ray").exists()


def test_killed_worker_and_crash_restart_by_one_for_all(
    ikosd_factory: Callable[..., Instance], nodes: Nodes
) -> None:
    inst = start(ikosd_factory, nodes, TWO_ZONES)
    wa = wait_running_on(inst, "wa")
    wb = wait_running_on(inst, "wb")
    # kill -9 of the Ray worker process that hosts wa: one_for_all restarts both
    os.kill(wa["pid"], signal.SIGKILL)
    wa2 = wait_running_on(inst, "wa", not_pid=wa["pid"])
    wb2 = wait_running_on(inst, "wb", not_pid=wb["pid"])
    assert wa2["restarts"] == 1 and wb2["restarts"] == 1
    assert wa2["node_id"] == nodes.a.node_id  # its resources keep it in zone a
    assert "worker process died" in inst.log_text()
    # a crash in receive: the asker gets the traceback, the supervisor restarts as locally
    ref = ikos.ActorRef("wb", root=inst.root)
    with pytest.raises(ikos.ActorCrashed) as crashed:
        ref.ask("boom", timeout=60)
    assert "asked to crash" in crashed.value.traceback
    wait_for(
        lambda: (s := inst.status("wb"))["restarts"] == 2 and s["state"] == "running",
        TIMEOUT,
        message="wb restarted after its crash",
    )
    reasons = inst.log_text()
    assert "receive raised RuntimeError: asked to crash" in reasons
    assert ref.ask("where", timeout=60)["node_id"] == nodes.b.node_id


def test_intensity_exhaustion_escalates_to_the_parent(
    ikosd_factory: Callable[..., Instance], nodes: Nodes
) -> None:
    tree = """
        import ikos
        from ray_actors import where
        tree = ikos.Supervisor("root", max_restarts=5, within=60, children=[
            ikos.Supervisor("pool", max_restarts=1, within=60, children=[
                ikos.Child("w", "ray_actors:Where", start_timeout=120),
            ], placement=ikos.Ray({"zone_a": 0.01})),
        ])
    """
    inst = start(ikosd_factory, nodes, tree)
    ref = ikos.ActorRef("w", root=inst.root)
    first = wait_running_on(inst, "w")
    with pytest.raises(ikos.ActorCrashed):
        ref.ask("boom", timeout=60)  # restart 1 of 1: pool restarts w
    second = wait_running_on(inst, "w", not_pid=first["pid"])
    with pytest.raises(ikos.ActorCrashed):
        ref.ask("boom", timeout=60)  # over the intensity: pool gives up, root restarts it
    wait_for(
        lambda: inst.status("pool")["restarts"] == 1 and inst.state("pool") == "running",
        TIMEOUT,
        message="root to restart pool once pool gave up",
    )
    third = wait_running_on(inst, "w", not_pid=second["pid"])
    assert third["node_id"] == nodes.a.node_id
    assert "supervisor pool: reached max restart intensity (1 in 60 s)" in inst.log_text()


def test_node_loss_restarts_its_actors_on_the_surviving_node(
    ikosd_factory: Callable[..., Instance], nodes: Nodes
) -> None:
    tree = f"""
        import ikos
        from ray_actors import where
        tree = ikos.Supervisor("root", max_restarts=5, within=60, children=[
            where("mover", resources={{"movable": 0.01}}),
            where("stay", node="{nodes.a.node_id}"),
        ])
    """
    inst = start(ikosd_factory, nodes, tree)
    before = wait_running_on(inst, "mover")
    stay = wait_running_on(inst, "stay")
    assert stay["node_id"] == nodes.a.node_id  # pinned to a node by its id
    lost = nodes.b if before["node_id"] == nodes.b.node_id else nodes.c
    survivor = nodes.c if lost is nodes.b else nodes.b
    nodes.cluster.remove_node(lost)
    after = wait_running_on(inst, "mover", not_pid=before["pid"])
    assert after["node_id"] == survivor.node_id and after["restarts"] == 1
    assert "node lost" in inst.log_text()
    ref = ikos.ActorRef("mover", root=inst.root)
    assert ref.ask("where", timeout=60)["node_id"] == survivor.node_id
    # one_for_one: the actor on another node never stopped
    assert inst.status("stay")["pid"] == stay["pid"] and inst.status("stay")["restarts"] == 0
