"""What may be done to the running tree: every request goes through a supervisor's queue.

:class:`TreeOperations` is the one implementation of the
:class:`~ikos.manager._extension.Operations` that services and the control
socket use: start, stop, restart, kill and reload a daemon, fail it (a
health check's verdict), add, change and remove children at run time, the
dynamic children of ``simple_one_for_one`` supervisors, and the
configuration reload. Each request that changes a supervisor's children is a
command of that supervisor's queue (``SupervisorNode.call``), so it never
interleaves with a restart in progress; and each keeps the manager's
specification of the tree (``tree``) and its dependency graph in step with
the running nodes, so that a later reload diffs against the truth.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ikos._errors import ManagerError
from ikos.manager._spawn_service import SPAWNED_NAME
from ikos.registry._graph import check_graph, start_order
from ikos.supervision._edit import insert_spec, remove_spec, replace_spec
from ikos.supervision._runtime import Node, State, SupervisorNode, WorkerNode
from ikos.supervision._spec import AnySpec, Child, Exec, Supervisor, validate_tree

if TYPE_CHECKING:
    from ikos.manager._manager import Manager


class TreeOperations:
    """The operations of one manager; see the module docstring."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager

    # -- one daemon ------------------------------------------------------------------

    async def start(self, name: str) -> dict[str, Any]:
        node = self.m.node(name)
        parent = node.parent
        if parent is None:
            assert isinstance(node, SupervisorNode)
            node.held = False
            await node.start()
        else:
            await parent.call(lambda: parent.start_child(node))
        return self.m.status_of(node)

    async def stop(self, name: str) -> dict[str, Any]:
        node = self.m.node(name)
        parent = node.parent
        if parent is None:
            node.held = True
            await node.terminate("stopped by request")
        else:
            await parent.call(lambda: parent.stop_child(node))
        return self.m.status_of(node)

    async def restart(self, name: str) -> dict[str, Any]:
        node = self.m.node(name)
        parent = node.parent
        if parent is None:
            await node.terminate("restart requested")
            node.held = False
            await node.start()
        else:
            await parent.call(lambda: parent.restart_child(node))
        return self.m.status_of(node)

    async def fail(self, name: str, reason: str) -> None:
        """Stop a running worker as a failure, for its supervisor to handle like a crash."""
        node = self.m.node(name)
        if node.alive or node.kind == "supervisor":
            await node.fail(reason)  # a supervisor's fail raises: only a daemon can be

    def kill(self, name: str, sig: int) -> dict[str, Any]:
        """Send ``sig`` to the daemon (every worker of a supervisor's subtree)."""
        node = self.m.node(name)
        workers = node.walk() if isinstance(node, SupervisorNode) else [node]
        pids = []
        for w in workers:
            if isinstance(w, WorkerNode) and w.handle is not None and w.handle.send_signal(sig):
                pids.append(w.handle.pid)
        if not pids:
            raise ManagerError(f"'{name}' has no running process to signal")
        return {"name": name, "pid": pids[0] if len(pids) == 1 else pids, "signal": sig}

    async def reload(self, name: str) -> dict[str, Any]:
        """Reload an executable (its reload command or signal; notify waits for READY=1)."""
        from ikos.manager._exec import ExecHandle

        node = self.m.node(name)
        if not isinstance(node, WorkerNode) or not isinstance(node.spec, Exec):
            raise ManagerError(f"'{name}' is {node.kind}: only executables reload (use restart)")
        handle = node.handle
        if not isinstance(handle, ExecHandle) or not handle.alive:
            raise ManagerError(f"'{name}' is not running")
        await handle.reload()
        return self.m.status_of(node)

    async def upgrade(self, name: str) -> dict[str, Any]:
        """Hot code upgrade of actor ``name`` (``ikos.manager._actors``), in its
        supervisor's queue so that no restart interleaves; the manager records it."""
        node = self.m.node(name)
        if not isinstance(node, WorkerNode) or not isinstance(node.spec, Child):
            what = "an executable" if isinstance(node, WorkerNode) else "a supervisor"
            raise ManagerError(
                f"'{name}' is {what}: only actors can be upgraded (restart it instead)",
                "bad_request",
            )
        parent = node.parent
        assert parent is not None  # the root is a supervisor

        async def upgrade() -> dict[str, Any]:
            if node.state is not State.RUNNING or not node.alive:
                raise ManagerError(
                    f"actor '{name}' is not running ({node.state.value}): start it instead",
                    "bad_request",
                )
            result = await self.m.actors.upgrade(node)
            self.m.upgraded(node, result["old_pid"])
            return result

        result: dict[str, Any] = await parent.call(upgrade)
        return result

    # -- children added, changed and removed at run time ---------------------------

    def _supervisor(self, name: str | None) -> SupervisorNode:
        root = self.m.root
        if root is None:
            raise ManagerError("ikosd is still starting: try again once it is ready")
        node = self.m.find(name or root.name)
        if not isinstance(node, SupervisorNode):
            raise ManagerError(f"no supervisor named '{name}'")
        return node

    def _set_tree(self, tree: Supervisor) -> None:
        """Make ``tree`` the manager's spec, and give each running supervisor its new spec."""
        m = self.m
        m.set_tree(tree, check_graph(tree))
        for _, spec in tree.walk():
            if isinstance(spec, Supervisor):
                node = m.find(spec.name)
                if isinstance(node, SupervisorNode):
                    node.spec = spec

    async def add_child(self, spec: AnySpec, supervisor: str | None, *, start: bool) -> Node:
        sup = self._supervisor(supervisor)
        if sup.template is not None:
            raise ManagerError(
                f"'{sup.name}' is simple_one_for_one: it takes instances of its template only"
            )
        tree = insert_spec(self.m.tree, sup.name, spec)
        validate_tree(tree)
        check_graph(tree)
        # OTP's start_child: a child that fails to start is not kept, and the caller
        # hears why (a configuration reload, which adds what it can, is not strict)
        add = functools.partial(sup.add_child, spec, None, start=start, strict=True)
        node: Node = await sup.call(add)
        self._set_tree(tree)
        return node

    async def update_child(self, name: str, spec: AnySpec, *, restart: bool) -> Node:
        node = self.m.node(name)
        sup = node.parent
        if sup is None or not isinstance(node, WorkerNode) or isinstance(spec, Supervisor):
            raise ManagerError(f"'{name}' is not a worker of a supervisor")
        tree = replace_spec(self.m.tree, spec)
        validate_tree(tree)
        check_graph(tree)
        try:
            await sup.call(functools.partial(sup.update_child, node, spec, restart=restart))
        finally:
            if self.m.find(name) is node:
                self._set_tree(tree)
        return node

    async def remove_child(self, name: str) -> None:
        node = self.m.node(name)
        sup = node.parent
        if sup is None:
            raise ManagerError(f"'{name}' is the root supervisor: it cannot be removed")
        await sup.call(functools.partial(sup.remove_child, node))
        self._set_tree(remove_spec(self.m.tree, name))

    # -- simple_one_for_one ------------------------------------------------------------

    async def start_child(self, supervisor: str, args: tuple[Any, ...]) -> dict[str, Any]:
        """simple_one_for_one: start a new instance of the supervisor's template."""
        sup = self.m.node(supervisor)
        if not isinstance(sup, SupervisorNode) or sup.template is None:
            raise ManagerError(f"'{supervisor}' is not a simple_one_for_one supervisor")
        node = await sup.call(functools.partial(sup.add_dynamic, args))
        return self.m.status_of(node)

    async def terminate_child(self, name: str) -> dict[str, Any]:
        """Stop a dynamic child and remove it from its supervisor."""
        node = self.m.node(name)
        sup = node.parent
        if sup is not None and sup.name == SPAWNED_NAME:  # ikos.spawn's: in the tree's spec
            await self.remove_child(name)
            return {"name": name, "removed": True}
        if sup is None or sup.template is None:
            raise ManagerError(
                f"'{name}' is not a dynamic child (simple_one_for_one or ikos.spawn)"
            )
        await sup.call(functools.partial(sup.remove_child, node))
        return {"name": name, "removed": True}

    # -- configuration reload ----------------------------------------------------------

    async def reconcile(self, new_tree: Supervisor) -> dict[str, list[str]]:
        """Bring the running tree in line with ``new_tree``: start added, stop removed,
        restart changed, leave the rest running."""
        m = self.m
        root = m.root
        assert root is not None
        if new_tree.name != root.name:
            raise ManagerError(
                f"the root supervisor's name changed ({root.name} -> {new_tree.name}): "
                "restart ikosd to apply that"
            )
        graph = check_graph(new_tree)
        m.set_tree(new_tree, graph)
        result: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
        await self._reconcile(root, new_tree, result)
        return result

    async def _reconcile(
        self, sup: SupervisorNode, spec: Supervisor, result: dict[str, list[str]]
    ) -> None:
        by_name = {c.name: c for c in spec.children}
        for node in list(sup.children):
            if node.name not in by_name:
                await sup.call(functools.partial(sup.remove_child, node))
                result["removed"].append(node.name)
        sup.spec = spec
        dynamic = spec.strategy == "simple_one_for_one"
        order = [c.name for c in spec.children] if dynamic else start_order(spec, self.m.graph)
        for name in order:
            child_spec = by_name[name]
            current = next((n for n in sup.children if n.name == name), None)
            if current is None:
                if not dynamic:
                    await sup.call(functools.partial(sup.add_child, child_spec, None))
                    result["added"].append(name)
            elif isinstance(child_spec, Supervisor) and isinstance(current, SupervisorNode):
                if _own_fields(child_spec) != _own_fields(current.spec):
                    await sup.call(functools.partial(sup.replace_child, current, child_spec))
                    result["changed"].append(name)
                else:
                    await self._reconcile(current, child_spec, result)
            elif child_spec != current.spec:
                await sup.call(functools.partial(sup.replace_child, current, child_spec))
                result["changed"].append(name)
        if not dynamic:
            rank = {n: i for i, n in enumerate(order)}
            sup.children.sort(key=lambda n: rank.get(n.name, len(rank)))


def _own_fields(spec: Supervisor) -> tuple[Any, ...]:
    return (
        spec.strategy,
        spec.max_restarts,
        spec.within,
        spec.restart,
        spec.shutdown,
        spec.requires,
        spec.after,
        spec.backoff,
    )
