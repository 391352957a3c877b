"""The Ray bridge: the one process of an instance that is a Ray driver.

ikosd starts it (``python -m ikos.manager._ray_bridge FD``) the first time a
child placed on Ray starts, and talks to it over a socket pair in JSON lines
(``ikos/manager/_ray.py`` is the other end). The bridge calls
``ray.init(address=...)``, creates each placed child as a Ray actor
(:class:`~ikos.actors._ray_host.ActorHost`, ``max_restarts=0``, the child's
resources, node affinity, labels or placement group), stops and kills them,
and reports every end of one as an ``exit`` event.

Why a process of its own and not ikosd: ``import ray`` takes a second and
a hundred megabytes, and a Ray driver runs a dozen threads of its own (gRPC,
the core worker, log monitors) and installs handlers; ikosd's loop must
never block, and ikosd must stay as light as it is for the instances that
never use Ray. The bridge is also the *owner* of the Ray actors: they are not
detached, so if the bridge dies (ikosd crashed, or was killed) Ray removes
them; nothing is left on the cluster that no ikosd knows of.

Deaths without polling: each actor has one call of ``watch`` outstanding (it
returns when the actor ends by itself: crash, stop, on_start failure) and
one thread waits on all of them with ``ray.wait``; when Ray loses the
actor's process or its node, the call fails at once with ``ActorDiedError``,
whose text says which (killed by ``ray.kill``, worker process died, node
died). The reason is classified here and sent as the exit event.

Requests (one JSON object a line, each with an ``id`` answered by a line
with the same ``id``): ``spawn`` (name, incarnation, actor path, encoded
arguments, placement), ``stop`` (name, timeout: ``stop`` then ``ray.kill``),
``kill`` (name), ``nodes``. Events: ``ready`` (once connected), ``exit``
(name, incarnation, code, signal, reason, detail, cause).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

#: Longest a ``ray.wait`` over the watches lasts before new watches join it.
WATCH_TURN = 0.05
#: How long a spawn retries while a restarted actor's name is still held by its predecessor.
NAME_RELEASE_WAIT = 10.0


class Bridge:
    """The bridge's state: the live actors, their watches, the line to ikosd."""

    def __init__(self, sock: socket.socket, address: str | None, namespace: str) -> None:
        self.sock = sock
        self.address = address
        self.namespace = namespace
        self.out_lock = threading.Lock()
        self.lock = threading.Lock()
        #: name -> (incarnation, handle, watch ref)
        self.actors: dict[str, tuple[int, Any, Any]] = {}
        #: names whose end ikos asked for (stop or kill): "killed", not a crash
        self.ending: dict[str, str] = {}
        self.host_class: Any = None

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        with self.out_lock:
            self.sock.sendall(data)

    # -- start -------------------------------------------------------------

    def connect(self) -> None:
        import ray

        from ikos.actors._ray_host import CONCURRENCY_GROUPS, ActorHost

        local: dict[str, Any] = {} if self.address else {"include_dashboard": False}
        ray.init(address=self.address, namespace=self.namespace, log_to_driver=False, **local)
        self.host_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ActorHost)
        threading.Thread(target=self.watch_loop, name="ikos-ray-watch", daemon=True).start()
        self.send({"event": "ready", "address": ray.get_runtime_context().gcs_address})

    # -- requests ----------------------------------------------------------

    def serve(self) -> None:
        reader = self.sock.makefile("rb")
        for line in reader:
            try:
                request = json.loads(line)
            except ValueError:
                continue
            op = request.get("op")
            if op in ("spawn", "stop"):  # slow (scheduling, on_start, on_stop): a thread each
                threading.Thread(target=self.answer, args=(request,), daemon=True).start()
            else:
                self.answer(request)
        # ikosd closed the line: it is gone or stopping; our actors go with us
        self.shutdown()

    def answer(self, request: dict[str, Any]) -> None:
        op = request.get("op")
        try:
            if op == "spawn":
                reply = self.spawn(request)
            elif op == "stop":
                reply = self.stop(request["name"], float(request.get("timeout", 5.0)))
            elif op == "kill":
                reply = self.kill(request["name"], "killed")
            elif op == "nodes":
                reply = self.nodes()
            else:
                reply = {"ok": False, "reason": f"unknown request {op!r}"}
        except Exception as exc:
            reply = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
            reply["detail"] = traceback.format_exc()
        reply["id"] = request.get("id")
        self.send(reply)

    def spawn(self, request: dict[str, Any]) -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,
            PlacementGroupSchedulingStrategy,
        )

        name, inc = str(request["name"]), int(request["inc"])
        placement = request.get("placement") or {}
        options: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "max_restarts": 0,  # ikos's supervisor decides, never Ray
            "max_task_retries": 0,
            "num_cpus": placement.get("num_cpus", 0.0),
            "resources": placement.get("resources") or {},
            "lifetime": None,  # owned by this driver: gone with it
        }
        if placement.get("memory"):
            options["memory"] = placement["memory"]
        if placement.get("labels"):
            options["label_selector"] = placement["labels"]
        node = placement.get("node")
        if node:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=self.node_id(node), soft=False
            )
        elif placement.get("placement_group"):
            group = ray.util.get_placement_group(placement["placement_group"])
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group,
                placement_group_bundle_index=int(placement.get("bundle", -1)),
            )
        boot = base64.b64decode(request["boot"])
        deadline = time.monotonic() + NAME_RELEASE_WAIT
        while True:
            try:
                handle = self.host_class.options(**options).remote(
                    name, request["actor"], boot, self.namespace
                )
                break
            except ValueError as exc:  # the name of the incarnation before is not free yet
                if "already" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        try:
            started = ray.get(handle.start.remote(), timeout=float(request.get("timeout", 30.0)))
        except Exception as exc:
            ray.kill(handle, no_restart=True)
            return {"ok": False, "code": 2, "reason": f"could not start on Ray: {_first(exc)}"}
        if not started.get("ok"):
            ray.kill(handle, no_restart=True)
            return {**started, "ok": False}
        watch = handle.watch.options(concurrency_group="watch").remote()
        with self.lock:
            self.actors[name] = (inc, handle, watch)
            self.ending.pop(name, None)
        return dict(started)

    def node_id(self, node: str) -> str:
        """A node given as an id or an IP address, as its id."""
        import ray

        for entry in ray.nodes():
            if entry.get("Alive") and node in (
                entry.get("NodeID"),
                entry.get("NodeManagerAddress"),
            ):
                return str(entry["NodeID"])
        raise ValueError(f"no live Ray node with id or address {node!r}")

    def stop(self, name: str, timeout: float) -> dict[str, Any]:
        import ray

        with self.lock:
            entry = self.actors.get(name)
        if entry is None:
            return {"ok": True, "running": False}
        _, handle, watch = entry
        stop = handle.stop.options(concurrency_group="control").remote()
        try:
            ray.get(stop, timeout=timeout)
        except Exception:  # did not stop in time, or died meanwhile: the kill ends it
            return self.kill(name, "killed")
        # the watch returns the exit the stop recorded, and ended() ends the process
        del watch
        return {"ok": True}

    def kill(self, name: str, why: str) -> dict[str, Any]:
        import ray

        with self.lock:
            entry = self.actors.get(name)
            if entry is None:
                return {"ok": True, "running": False}
            self.ending[name] = why
        ray.kill(entry[1], no_restart=True)
        return {"ok": True}

    def nodes(self) -> dict[str, Any]:
        import ray

        alive = [
            {"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
            for n in ray.nodes()
            if n.get("Alive")
        ]
        return {"ok": True, "nodes": alive}

    # -- deaths ------------------------------------------------------------

    def watch_loop(self) -> None:
        import ray

        while True:
            with self.lock:
                refs = {entry[2]: name for name, entry in self.actors.items()}
            if not refs:
                time.sleep(WATCH_TURN)
                continue
            done, _ = ray.wait(list(refs), num_returns=1, timeout=WATCH_TURN)
            for ref in done:
                self.ended(refs[ref], ref)

    def ended(self, name: str, ref: Any) -> None:
        import ray

        with self.lock:
            entry = self.actors.get(name)
            if entry is None or entry[2] != ref:
                return
            del self.actors[name]
            asked = self.ending.pop(name, None)
        inc, handle = entry[0], entry[1]
        event: dict[str, Any] = {"event": "exit", "name": name, "inc": inc, "signal": None}
        try:
            own = ray.get(ref, timeout=5)
        except Exception as exc:
            event.update(classify(exc, asked))
        else:  # it ended by itself (stop, crash): make sure the process is gone
            event.update(code=own.get("code"), reason=own.get("reason"), cause="exit")
            event["detail"] = own.get("detail", "")
            ray.kill(handle, no_restart=True)
        self.send(event)

    def shutdown(self) -> None:
        import ray

        with self.lock:
            handles = [entry[1] for entry in self.actors.values()]
            self.actors.clear()
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
        ray.shutdown()


def classify(exc: BaseException, asked: str | None) -> dict[str, Any]:
    """An ``ActorDiedError`` as an exit: who ended the actor, as the tree records it."""
    text = str(exc)
    if asked is not None or "ray.kill" in text:
        return {"code": None, "signal": int(signal.SIGKILL), "reason": "killed", "cause": "killed"}
    if "node has died" in text or "node died" in text.lower() or "its node" in text:
        node = ""
        for line in text.splitlines():
            if "Node Id:" in line or "Node ID:" in line:
                node = line.split(":", 1)[1].strip().split()[0]
        return {
            "code": None,
            "reason": f"node lost{f' ({node[:12]})' if node else ''}",
            "cause": "node_lost",
            "detail": text[-2000:],
        }
    return {
        "code": None,
        "reason": "killed: its Ray worker process died",
        "cause": "worker_died",
        "detail": text[-2000:],
    }


def _first(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def main() -> None:
    """``python -m ikos.manager._ray_bridge FD ADDRESS NAMESPACE`` (ADDRESS "" = local)."""
    fd, address, namespace = int(sys.argv[1]), sys.argv[2] or None, sys.argv[3]
    sock = socket.socket(fileno=fd)
    os.setsid()  # ikosd's terminal signals are ikosd's
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    bridge = Bridge(sock, address, namespace)
    try:
        bridge.connect()
    except Exception as exc:
        bridge.send({"event": "failed", "reason": f"ray.init failed: {_first(exc)}"})
        sys.exit(1)
    bridge.serve()


if __name__ == "__main__":
    main()
