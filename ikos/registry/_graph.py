"""The dependency graph of a supervision tree: start order, start waves, cycles.

One networkx ``DiGraph`` covers the whole tree. Its nodes are the names of
every spec (supervisors included, each with attributes ``spec``, ``path``
and ``parent``); an edge ``dep -> name`` with ``kind="requires"`` or
``kind="after"`` says that ``name`` starts only once ``dep`` is ready.
``requires`` also means "stop before it" and "restart with it" (see
:func:`dependents`); ``after`` is ordering only, as in systemd.

Two rules give dependencies a meaning in a tree:

* A supervisor is ready once all of its children are, so a dependency *on*
  a supervisor is a dependency on its whole subtree being ready.
* Supervisors start their own children, so ordering is decided per
  supervisor, among its direct children. A dependency that crosses
  subtrees is *projected* onto siblings: if anything in child A's subtree
  needs anything in sibling B's subtree, B starts (and becomes ready)
  before A. The graph itself stays simple, with an edge from ``Y`` to the
  child that names it and no edge to the child's ancestors; the projection
  is computed when an order is asked for (:func:`start_order`).

The main design choice is that start order comes from the graph, with the
list order of the children breaking every tie (a lexicographic topological
sort keyed by list index). A tree without dependencies therefore starts
exactly as OTP would start it, and ``rest_for_one``, which restarts a child
and every sibling started after it, always takes along what depends on it.
Hand-written depth-first ordering was rejected: networkx already gives
sorts, generations and cycle paths, and tested ones.

networkx is imported only for a tree that has dependencies. Without a single
``requires`` or ``after`` the start order is the list order and every
supervisor starts its children in one wave: :func:`check_graph` then returns
``None`` (:data:`NO_DEPENDENCIES`) instead of a graph, and the functions
taking a graph answer from the children alone. That saves ikosd the import
of networkx (a third of its launch) for the common tree; whenever there is
an edge, the order is networkx's, as above.

This layer sits below supervision, so it does not know ``ikos.Supervisor``:
it reads a tree through two small protocols, :class:`DependencyNode` (a
name and its dependencies) and :class:`DependencyGroup` (one with
``children``), which the supervision specs satisfy as they are.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

from ikos._errors import SpecError

if TYPE_CHECKING:
    import networkx as nx

DEP_KINDS: tuple[str, ...] = ("requires", "after")

#: What :func:`check_graph` returns for a tree without any dependency: no graph at all.
NO_DEPENDENCIES = None
#: A checked tree's dependencies: a networkx graph, or None when there are none.
DependencyGraph: TypeAlias = "nx.DiGraph | None"


class DependencyNode(Protocol):
    """What the graph reads of a spec: its name and what it needs (``ikos.Child``, ``Exec``)."""

    @property
    def name(self) -> str: ...

    @property
    def requires(self) -> Sequence[str]: ...

    @property
    def after(self) -> Sequence[str]: ...


@runtime_checkable
class DependencyGroup(DependencyNode, Protocol):
    """A node with children, started by itself (``ikos.Supervisor``)."""

    @property
    def children(self) -> Sequence[DependencyNode]: ...


class DependencyCycle(SpecError):
    """The dependencies of a tree form a cycle, so nothing in it could start.

    ``cycle`` lists the names around the cycle, each one needing the next,
    the first name repeated at the end: ``["a", "b", "a"]`` prints as
    ``dependency cycle: a -> b -> a``. ``detail`` says which dependencies
    make it when the cycle is one of subtrees rather than of single children.
    """

    def __init__(self, cycle: list[str], path: str = "", detail: str = "") -> None:
        text = " -> ".join(cycle)
        super().__init__(path or (cycle[0] if cycle else "<tree>"), "requires", "no cycle", text)
        self.cycle = list(cycle)
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.cycle, self.path, self.detail))

    def __str__(self) -> str:
        text = "dependency cycle: " + " -> ".join(self.cycle)
        if self.detail:
            text += f" ({self.detail})"
        return text


class UnknownDependency(SpecError):
    """A ``requires`` or ``after`` names no spec in the tree.

    ``child`` is the dependent's name, ``key`` the field and ``name`` the
    unknown dependency; ``path`` locates the child in the tree.
    """

    def __init__(self, child: str, key: str, name: str, path: str = "") -> None:
        super().__init__(path or child, key, "the name of a child in the tree", name)
        self.child = child
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.child, self.key, self.name, self.path))

    def __str__(self) -> str:
        return (
            f"{self.path}: {self.key}: unknown name {self.name!r}"
            " (no child of that name in the tree)"
        )


def _walk(root: DependencyNode) -> Iterator[tuple[str, DependencyNode, str | None]]:
    """``(path, spec, parent name)`` for every spec of the tree, depth first."""
    stack: list[tuple[str, DependencyNode, str | None]] = [(root.name, root, None)]
    while stack:
        path, spec, parent = stack.pop()
        yield path, spec, parent
        if isinstance(spec, DependencyGroup):
            for child in reversed(spec.children):
                stack.append((f"{path}/{child.name}", child, spec.name))


def build_graph(root: DependencyGroup) -> nx.DiGraph:
    """The dependency graph of the whole tree under ``root``.

    Nodes are spec names with attributes ``spec``, ``path`` (``"root/sub/x"``)
    and ``parent`` (``None`` for the root); an edge ``dep -> name`` carries
    ``kind="requires"`` or ``kind="after"`` (``"requires"`` when a child
    names the same dependency in both). Raises :class:`UnknownDependency`
    for a dependency naming nothing in the tree and :class:`SpecError` for
    a name used twice, since either would silently corrupt the graph;
    cycles are left to :func:`check_graph`.

    Example::

        >>> g = build_graph(Supervisor("root", children=[
        ...     Exec("db", "/bin/true"), Exec("api", "/bin/true", requires=["db"])]))
        >>> g.edges["db", "api"]["kind"]
        'requires'
    """
    import networkx as nx

    graph = nx.DiGraph()
    specs = list(_walk(root))
    _check_unique(specs)
    for path, spec, parent in specs:
        graph.add_node(spec.name, spec=spec, path=path, parent=parent)
    for path, spec, _ in specs:
        for kind in DEP_KINDS:
            for dep in getattr(spec, kind):
                if dep not in graph:
                    raise UnknownDependency(spec.name, kind, dep, path)
                if graph.has_edge(dep, spec.name) and kind == "after":
                    continue  # already there as "requires", the stronger kind
                graph.add_edge(dep, spec.name, kind=kind)
    return graph


def _check_unique(specs: Sequence[tuple[str, DependencyNode, str | None]]) -> None:
    """Raise :class:`SpecError` for a name used twice: it would corrupt the graph."""
    seen: dict[str, str] = {}
    for path, spec, _ in specs:
        if spec.name in seen:
            where = seen[spec.name]
            raise SpecError(path, "name", f"a name unique in the tree (also at {where})", spec.name)
        seen[spec.name] = path


def _has_dependencies(specs: Sequence[tuple[str, DependencyNode, str | None]]) -> bool:
    return any(getattr(spec, kind) for _, spec, _ in specs for kind in DEP_KINDS)


def _subtree_names(spec: DependencyNode) -> list[str]:
    return [s.name for _, s, _ in _walk(spec)]


def _projection(sup: DependencyGroup, graph: nx.DiGraph) -> nx.DiGraph:
    """``sup``'s children, with an edge B -> A when A's subtree needs B's subtree.

    Each projected edge keeps in ``why`` one dependency that causes it, for
    error messages.
    """
    import networkx as nx

    owner: dict[str, str] = {}
    proj = nx.DiGraph()
    for child in sup.children:
        proj.add_node(child.name)
        for name in _subtree_names(child):
            owner[name] = child.name
    for name, sibling in owner.items():
        if name not in graph:
            continue
        for dep in graph.predecessors(name):
            dep_sibling = owner.get(dep)
            if dep_sibling is None or dep_sibling == sibling:
                continue  # outside sup (ordered higher up) or inside the same subtree
            if not proj.has_edge(dep_sibling, sibling):
                kind = graph.edges[dep, name].get("kind", "requires")
                proj.add_edge(dep_sibling, sibling, why=f"{name} {kind} {dep}")
    return proj


def _cycle_error(graph: nx.DiGraph, order: dict[str, int], path: str, why: bool) -> DependencyCycle:
    """Find a cycle of ``graph`` and describe it, each name needing the next."""
    import networkx as nx

    edges = nx.find_cycle(graph)
    # Edges point from dependency to dependent; print the other way round,
    # "a -> b" reading "a needs b", starting from the earliest name.
    needs = [v for _, v, *_ in edges]
    needs.reverse()
    start = min(range(len(needs)), key=lambda i: order.get(needs[i], len(order)))
    cycle = needs[start:] + needs[:start]
    detail = ""
    if why:
        reasons = [graph.edges[u, v]["why"] for u, v, *_ in edges]
        detail = "; ".join(sorted(reasons))
    if not path:
        path = str(graph.nodes[cycle[0]].get("path", cycle[0]))
    return DependencyCycle([*cycle, cycle[0]], path, detail)


def start_order(sup: DependencyGroup, graph: DependencyGraph) -> list[str]:
    """The order in which ``sup`` starts its direct children (names).

    A topological order of the children under the sibling projection of the
    dependencies (see the module docstring), list order breaking ties, so
    that a supervisor without dependencies starts its children in list
    order. Raises :class:`DependencyCycle` when the projection has a cycle.
    Without a graph (:data:`NO_DEPENDENCIES`) the order is the list order.

    Example::

        >>> sup = Supervisor("root", children=[
        ...     Exec("api", "/bin/true", requires=["db"]), Exec("db", "/bin/true")])
        >>> start_order(sup, build_graph(sup))
        ['db', 'api']
    """
    if graph is NO_DEPENDENCIES:
        return [child.name for child in sup.children]
    import networkx as nx

    index = {child.name: i for i, child in enumerate(sup.children)}
    proj = _projection(sup, graph)
    try:
        return list(nx.lexicographical_topological_sort(proj, key=index.__getitem__))
    except nx.NetworkXUnfeasible:
        raise _cycle_error(proj, index, _path_of(sup, graph), why=True) from None


def start_waves(sup: DependencyGroup, graph: DependencyGraph) -> list[list[str]]:
    """``sup``'s direct children grouped in waves that may start in parallel.

    Wave k holds the children all of whose sibling dependencies are in
    earlier waves, each wave in list order; every child is in the earliest
    wave it can be in. Raises :class:`DependencyCycle` as :func:`start_order`.
    Without a graph (:data:`NO_DEPENDENCIES`) all children form one wave.

    Example::

        >>> sup = Supervisor("root", children=[Exec("a", "/bin/true"),
        ...     Exec("b", "/bin/true", after=["a"]), Exec("c", "/bin/true")])
        >>> start_waves(sup, build_graph(sup))
        [['a', 'c'], ['b']]
    """
    if graph is NO_DEPENDENCIES:
        return [[child.name for child in sup.children]] if sup.children else []
    import networkx as nx

    index = {child.name: i for i, child in enumerate(sup.children)}
    proj = _projection(sup, graph)
    try:
        return [sorted(wave, key=index.__getitem__) for wave in nx.topological_generations(proj)]
    except nx.NetworkXUnfeasible:
        raise _cycle_error(proj, index, _path_of(sup, graph), why=True) from None


def stop_order(sup: DependencyGroup, graph: DependencyGraph) -> list[str]:
    """The order in which ``sup`` stops its direct children: the start order reversed."""
    return start_order(sup, graph)[::-1]


def check_graph(root: DependencyGroup) -> DependencyGraph:
    """Build the graph of ``root``'s tree and check that the tree can start; return it.

    A tree without any ``requires`` or ``after`` has no graph to build: its
    names are checked to be unique and :data:`NO_DEPENDENCIES` is returned
    (networkx is not even imported).

    Raises :class:`UnknownDependency` for a ``requires``/``after`` naming
    nothing in the tree, and :class:`DependencyCycle`, with its path, for

    * a cycle of dependencies anywhere in the tree;
    * a dependency between a spec and its own ancestor or descendant (a
      supervisor is ready only once its children are, so neither can wait
      for the other);
    * a cycle between sibling subtrees, which :func:`start_order` would
      meet when starting their supervisor.

    A tree that passes can be started by every supervisor with
    :func:`start_order` or :func:`start_waves`.
    """
    specs = list(_walk(root))
    if not _has_dependencies(specs):
        _check_unique(specs)
        return NO_DEPENDENCIES
    import networkx as nx

    graph = build_graph(root)
    order = {name: i for i, name in enumerate(graph.nodes)}
    try:
        nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        pass
    else:
        raise _cycle_error(graph, order, "", why=False)
    for dep, name in graph.edges:
        for upper, lower in ((dep, name), (name, dep)):
            if _is_ancestor(graph, upper, lower):
                cycle = [name, dep, name]
                detail = f"{upper} contains {lower} and is ready only once it is"
                raise DependencyCycle(cycle, graph.nodes[name]["path"], detail)
    for _, spec, _ in _walk(root):
        if isinstance(spec, DependencyGroup):
            start_order(spec, graph)
    return graph


def _is_ancestor(graph: nx.DiGraph, upper: str, lower: str) -> bool:
    parent = graph.nodes[lower]["parent"]
    while parent is not None:
        if parent == upper:
            return True
        parent = graph.nodes[parent]["parent"]
    return False


def _path_of(sup: DependencyGroup, graph: nx.DiGraph) -> str:
    if sup.name in graph:
        return str(graph.nodes[sup.name].get("path", sup.name))
    return sup.name


def dependents(graph: nx.DiGraph, name: str, kinds: Collection[str] = ("requires",)) -> set[str]:
    """Every name that transitively depends on ``name`` (``name`` itself excluded).

    By default only ``requires`` edges count: what must be stopped or
    restarted along with ``name``. Pass ``kinds=("requires", "after")`` for
    everything ordered after it (``ikosctl tree --deps``). Dependents of a
    supervisor's children are not dependents of the supervisor. Raises
    ``KeyError`` when ``name`` is not in the graph.
    """
    if name not in graph:
        raise KeyError(name)
    found: set[str] = set()
    todo = [name]
    while todo:
        node = todo.pop()
        for succ, attrs in graph.succ[node].items():
            if attrs.get("kind") in kinds and succ not in found and succ != name:
                found.add(succ)
                todo.append(succ)
    return found
