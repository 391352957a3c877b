"""Edits of a tree's specification: add, replace, remove and find children by name.

Specs are immutable values, so an edit returns a new tree that shares every
untouched subtree with the old one. The manager keeps its specification of
the running tree in step with the nodes through these functions (children
added at run time, changed, removed), so that a configuration reload diffs
against what actually runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from ikos.supervision._spec import AnySpec, Supervisor


def _rebuilt(sup: Supervisor, children: Sequence[AnySpec]) -> Supervisor:
    return dataclasses.replace(sup, children=tuple(children))


def map_children(
    tree: Supervisor, visit: Callable[[Supervisor, list[AnySpec]], list[AnySpec]]
) -> Supervisor:
    """Rebuild ``tree`` with ``visit(supervisor, children)`` giving each supervisor's children."""

    def walk(sup: Supervisor) -> Supervisor:
        children = [walk(c) if isinstance(c, Supervisor) else c for c in sup.children]
        children = visit(sup, children)
        if len(children) == len(sup.children) and all(
            a is b for a, b in zip(children, sup.children, strict=True)
        ):
            return sup
        return _rebuilt(sup, children)

    return walk(tree)


def insert_spec(tree: Supervisor, parent: str, spec: AnySpec) -> Supervisor:
    """``tree`` with ``spec`` appended to the children of supervisor ``parent``."""
    return map_children(tree, lambda s, c: [*c, spec] if s.name == parent else c)


def replace_spec(tree: Supervisor, spec: AnySpec) -> Supervisor:
    """``tree`` with the child named as ``spec`` replaced by ``spec``."""
    return map_children(tree, lambda s, c: [spec if x.name == spec.name else x for x in c])


def remove_spec(tree: Supervisor, name: str) -> Supervisor:
    """``tree`` without the child called ``name``."""
    return map_children(tree, lambda s, c: [x for x in c if x.name != name])


def find_spec(tree: Supervisor, name: str) -> tuple[AnySpec, Supervisor | None] | None:
    """The spec called ``name`` and its supervisor's spec, if the tree has one."""
    if tree.name == name:
        return tree, None
    for child in tree.children:
        if child.name == name:
            return child, tree
        if isinstance(child, Supervisor):
            found = find_spec(child, name)
            if found is not None:
                return found
    return None
