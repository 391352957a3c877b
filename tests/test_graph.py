"""The dependency graph: start order, waves, projection onto siblings, cycles."""

from __future__ import annotations

import pickle
from typing import Any

import networkx as nx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ikos._errors import ConfigError, SpecError
from ikos.actors._actor import Actor
from ikos.registry._graph import (
    DependencyCycle,
    UnknownDependency,
    build_graph,
    check_graph,
    dependents,
    start_order,
    start_waves,
    stop_order,
)
from ikos.supervision._spec import AnySpec, Child, Exec, Supervisor


class Echo(Actor):
    def receive(self, message: Any) -> Any:
        return message


def ex(name: str, requires: tuple[str, ...] = (), after: tuple[str, ...] = ()) -> Exec:
    return Exec(name, "/bin/true", requires=requires, after=after)


def sup(name: str, *children: AnySpec, **kw: Any) -> Supervisor:
    return Supervisor(name, children=children, **kw)


def order(root: Supervisor, of: Supervisor | None = None) -> list[str]:
    return start_order(of or root, check_graph(root))


# --- hand-written cases -------------------------------------------------------


def test_list_order_is_kept_without_constraints() -> None:
    root = sup("root", ex("c"), ex("a"), Child("b", Echo), ex("d"))
    assert order(root) == ["c", "a", "b", "d"]
    assert start_waves(root, build_graph(root)) == [["c", "a", "b", "d"]]
    assert stop_order(root, build_graph(root)) == ["d", "b", "a", "c"]


def test_requires_moves_the_dependency_first_and_only_as_far_as_needed() -> None:
    root = sup("root", ex("api", requires=("db",)), ex("log"), ex("db"), ex("web", after=("api",)))
    assert order(root) == ["log", "db", "api", "web"]
    assert start_waves(root, build_graph(root)) == [["log", "db"], ["api"], ["web"]]


def test_edges_carry_their_kind() -> None:
    root = sup("root", ex("a"), ex("b", requires=("a",)), ex("c", after=("a",), requires=("b",)))
    g = build_graph(root)
    assert g.edges["a", "b"]["kind"] == "requires"
    assert g.edges["a", "c"]["kind"] == "after"
    assert g.edges["b", "c"]["kind"] == "requires"
    assert set(g.nodes) == {"root", "a", "b", "c"}
    assert g.nodes["c"]["path"] == "root/c" and g.nodes["c"]["parent"] == "root"
    assert g.nodes["root"]["parent"] is None


def test_requires_wins_over_after_for_the_same_pair() -> None:
    g = build_graph(sup("root", ex("a"), ex("b", requires=("a",), after=("a",))))
    assert g.edges["a", "b"]["kind"] == "requires"


def test_nested_dependencies_are_projected_onto_siblings() -> None:
    front = sup("front", ex("api", requires=("db",)), ex("cache"))
    store = sup("store", ex("db"), ex("backup", after=("db",)))
    root = sup("root", front, ex("metrics"), store)
    g = check_graph(root)
    assert start_order(root, g) == ["metrics", "store", "front"]
    assert start_waves(root, g) == [["metrics", "store"], ["front"]]
    # Inside front, db is outside and ordered higher up: list order stays.
    assert start_order(front, g) == ["api", "cache"]
    assert start_order(store, g) == ["db", "backup"]
    # The graph has the edge to the child only, not to its supervisor.
    assert g.has_edge("db", "api") and not g.has_edge("db", "front")


def test_a_dependency_on_a_supervisor_waits_for_its_subtree() -> None:
    store = sup("store", ex("db"), ex("index"))
    root = sup("root", ex("api", requires=("store",)), store)
    assert order(root) == ["store", "api"]


def test_cycle_message_shows_the_path() -> None:
    root = sup("root", ex("a", requires=("b",)), ex("b", requires=("a",)))
    with pytest.raises(DependencyCycle) as info:
        check_graph(root)
    assert "dependency cycle: a -> b -> a" in str(info.value)
    assert info.value.cycle == ["a", "b", "a"]
    assert isinstance(info.value, SpecError) and isinstance(info.value, ConfigError)
    with pytest.raises(DependencyCycle, match="a -> b -> a"):
        start_order(root, build_graph(root))
    with pytest.raises(DependencyCycle, match="a -> b -> a"):
        start_waves(root, build_graph(root))


def test_cycle_path_reads_as_each_name_needing_the_next() -> None:
    root = sup("root", ex("c", after=("a",)), ex("a", requires=("b",)), ex("b", requires=("c",)))
    with pytest.raises(DependencyCycle) as info:
        check_graph(root)
    assert info.value.cycle == ["c", "a", "b", "c"]
    assert str(info.value).startswith("dependency cycle: c -> a -> b -> c")


def test_cycle_between_subtrees_names_the_dependencies_that_make_it() -> None:
    left = sup("left", ex("a", requires=("b",)))
    right = sup("right", ex("b"), ex("c", after=("left",)))
    root = sup("root", left, right)
    with pytest.raises(DependencyCycle) as info:
        check_graph(root)
    text = str(info.value)
    assert "left -> right -> left" in text
    assert "a requires b" in text and "c after left" in text
    assert info.value.path == "root"


@pytest.mark.parametrize(
    "root",
    [
        sup("root", sup("mid", ex("a", requires=("mid",)))),
        sup("root", sup("mid", sup("low", ex("a", after=("mid",))))),
        sup("root", sup("mid", ex("a")), requires=("a",)),
    ],
)
def test_a_dependency_between_ancestor_and_descendant_is_a_cycle(root: Supervisor) -> None:
    with pytest.raises(DependencyCycle, match="contains"):
        check_graph(root)


def test_unknown_dependency_names_child_key_and_name() -> None:
    root = sup("root", sup("mid", ex("a", after=("ghost",))))
    with pytest.raises(UnknownDependency) as info:
        check_graph(root)
    err = info.value
    assert (err.child, err.key, err.name, err.path) == ("a", "after", "ghost", "root/mid/a")
    assert "root/mid/a" in str(err) and "after" in str(err) and "ghost" in str(err)
    assert isinstance(err, ConfigError)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(SpecError, match="unique"):
        build_graph(sup("root", ex("a"), sup("mid", ex("a"))))


def test_errors_survive_pickling() -> None:
    cycle = DependencyCycle(["a", "b", "a"], "root", "why")
    again = pickle.loads(pickle.dumps(cycle))
    assert (again.cycle, again.path, again.detail, str(again)) == (
        ["a", "b", "a"],
        "root",
        "why",
        str(cycle),
    )
    unknown = UnknownDependency("a", "requires", "x", "root/a")
    again2 = pickle.loads(pickle.dumps(unknown))
    assert (again2.child, again2.key, again2.name, str(again2)) == (
        "a",
        "requires",
        "x",
        str(unknown),
    )


def test_dependents_follow_requires_transitively() -> None:
    root = sup(
        "root",
        ex("db"),
        ex("api", requires=("db",)),
        ex("web", requires=("api",)),
        ex("report", after=("db",)),
        sup("jobs", ex("worker", requires=("api",))),
    )
    g = check_graph(root)
    assert dependents(g, "db") == {"api", "web", "worker"}
    assert dependents(g, "db", kinds=("requires", "after")) == {"api", "web", "worker", "report"}
    assert dependents(g, "web") == set()
    with pytest.raises(KeyError):
        dependents(g, "nobody")


# --- properties ---------------------------------------------------------------


@st.composite
def flat_dags(draw: st.DrawFn) -> tuple[Supervisor, list[tuple[str, str]]]:
    """A supervisor of n children and an acyclic set of (dependency, dependent) edges."""
    n = draw(st.integers(min_value=1, max_value=9))
    names = [f"c{i}" for i in range(n)]
    rank = draw(st.permutations(names))  # edges go from lower to higher rank
    pairs = [(a, b) for i, a in enumerate(rank) for b in rank[i + 1 :]]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True) if pairs else st.just([]))
    kinds = draw(st.lists(st.sampled_from(["requires", "after"]), min_size=len(edges)))
    children = []
    for name in names:
        deps = [(dep, k) for (dep, child), k in zip(edges, kinds, strict=False) if child == name]
        children.append(
            ex(
                name,
                requires=tuple(d for d, k in deps if k == "requires"),
                after=tuple(d for d, k in deps if k == "after"),
            )
        )
    return Supervisor("root", children=children), edges


def lexicographic_reference(names: list[str], edges: list[tuple[str, str]]) -> list[str]:
    """Repeatedly start the first child in list order whose dependencies have started."""
    done: list[str] = []
    while len(done) < len(names):
        ready = [n for n in names if n not in done and all(d in done for d, c in edges if c == n)]
        done.append(ready[0])
    return done


@given(flat_dags())
def test_order_is_the_list_order_first_topological_order(
    case: tuple[Supervisor, list[tuple[str, str]]],
) -> None:
    root, edges = case
    names = [c.name for c in root.children]
    got = order(root)
    assert sorted(got) == sorted(names)
    position = {name: i for i, name in enumerate(got)}
    assert all(position[dep] < position[child] for dep, child in edges)
    assert got == lexicographic_reference(names, edges)
    if not edges:
        assert got == names
    assert stop_order(root, build_graph(root)) == got[::-1]


@given(flat_dags())
def test_waves_partition_children_and_edges_go_forward(
    case: tuple[Supervisor, list[tuple[str, str]]],
) -> None:
    root, edges = case
    names = [c.name for c in root.children]
    waves = start_waves(root, build_graph(root))
    flat = [name for wave in waves for name in wave]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    wave_of = {name: k for k, wave in enumerate(waves) for name in wave}
    assert all(wave_of[dep] < wave_of[child] for dep, child in edges)
    for k, wave in enumerate(waves):
        assert wave == [n for n in names if n in wave]  # list order within a wave
        for name in wave:  # and as early as possible
            deps = [wave_of[d] for d, c in edges if c == name]
            assert k == (max(deps) + 1 if deps else 0)


@st.composite
def trees(draw: st.DrawFn) -> Supervisor:
    """A random tree of up to 12 specs with random dependencies between any two."""
    n = draw(st.integers(min_value=2, max_value=12))
    parent = [-1] + [draw(st.integers(min_value=0, max_value=i - 1)) for i in range(1, n)]
    names = [f"n{i}" for i in range(n)]
    deps = draw(
        st.lists(
            st.tuples(
                st.integers(0, n - 1), st.integers(0, n - 1), st.sampled_from(["requires", "after"])
            ).filter(lambda t: t[0] != t[1]),
            max_size=8,
        )
    )

    def build(i: int) -> AnySpec:
        requires = tuple(names[d] for c, d, k in deps if c == i and k == "requires")
        after = tuple(names[d] for c, d, k in deps if c == i and k == "after")
        kids = [build(j) for j in range(n) if parent[j] == i]
        if kids or i == 0:
            return Supervisor(names[i], children=kids, requires=requires, after=after)
        return ex(names[i], requires=requires, after=after)

    root = build(0)
    assert isinstance(root, Supervisor)
    return root


def edges(graph: nx.DiGraph | None) -> list[tuple[str, str]]:
    """The graph's edges (none for the None of a tree without dependencies)."""
    return [] if graph is None else list(graph.edges)


def simulate_start(root: Supervisor, graph: nx.DiGraph | None) -> list[tuple[str, str]]:
    """Start the tree as supervisors do: children in start order, each ready before the next."""
    events: list[tuple[str, str]] = []

    def start(spec: AnySpec) -> None:
        events.append(("start", spec.name))
        if isinstance(spec, Supervisor):
            by_name = {c.name: c for c in spec.children}
            for name in start_order(spec, graph):
                start(by_name[name])
        events.append(("ready", spec.name))

    start(root)
    return events


@given(trees())
def test_a_checked_tree_starts_with_every_dependency_ready_first(root: Supervisor) -> None:
    try:
        graph = check_graph(root)
    except DependencyCycle as err:
        assert len(err.cycle) >= 2 and err.cycle[0] == err.cycle[-1]
        return
    events = simulate_start(root, graph)
    at = {event: i for i, event in enumerate(events)}
    for dep, name in edges(graph):
        assert at["ready", dep] < at["start", name]


@given(trees())
def test_deps_only_on_earlier_leaves_always_pass(root: Supervisor) -> None:
    # Keep only dependencies of a leaf on a leaf earlier in depth-first order:
    # such a tree can always start, so check_graph must accept it.
    leaves = [s.name for _, s in root.walk() if not isinstance(s, Supervisor)]

    def prune(spec: AnySpec) -> AnySpec:
        if isinstance(spec, Supervisor):
            return Supervisor(spec.name, children=[prune(c) for c in spec.children])
        earlier = leaves[: leaves.index(spec.name)]
        return ex(
            spec.name,
            requires=tuple(d for d in spec.requires if d in earlier),
            after=tuple(d for d in spec.after if d in earlier),
        )

    pruned = prune(root)
    assert isinstance(pruned, Supervisor)
    graph = check_graph(pruned)
    events = simulate_start(pruned, graph)
    at = {event: i for i, event in enumerate(events)}
    assert all(at["ready", dep] < at["start", name] for dep, name in edges(graph))


@given(trees())
def test_a_tree_without_dependencies_starts_as_networkx_would_start_it(root: Supervisor) -> None:
    # check_graph skips networkx for a tree without any requires or after (ikosd's
    # launch): its orders must be exactly those of the networkx graph of the same tree
    def strip(spec: AnySpec) -> AnySpec:
        if isinstance(spec, Supervisor):
            return Supervisor(spec.name, children=[strip(c) for c in spec.children])
        return ex(spec.name)

    bare = strip(root)
    assert isinstance(bare, Supervisor)
    assert check_graph(bare) is None
    full = build_graph(bare)
    for _, spec in bare.walk():
        if isinstance(spec, Supervisor):
            assert start_order(spec, None) == start_order(spec, full)
            assert start_waves(spec, None) == start_waves(spec, full)


def test_a_name_used_twice_is_refused_without_dependencies_too() -> None:
    with pytest.raises(SpecError, match="unique"):
        check_graph(sup("root", ex("a"), sup("mid", ex("a"))))
