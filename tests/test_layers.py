"""Each layer of ikos imports only the layers below it (docs/architecture.md), checked.

Every module under ``ikos/`` is parsed with ``ast`` and every import in it,
at module level or inside a function (an import deferred to a function is a
dependency all the same), ``import x`` or ``from x import y``, absolute or
relative, is mapped to the layer it reaches. An import of a higher layer
fails the test, which lists all of them. The checker is itself tested on
module texts made up for the purpose, so that a checker that sees nothing
cannot pass for a clean tree.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

IKOS = Path(__file__).resolve().parent.parent / "ikos"

#: The layers, bottom up (DESIGN.md, docs/architecture.md).
LAYERS = ("platform", "monitor", "actors", "ipc", "registry", "supervision", "manager", "cli")
#: Modules below every layer: errors, codec, version.
BASE = frozenset({"ikos._errors", "ikos._codec", "ikos._version"})
#: The public facade, above every layer: ``import ikos`` and ``ikos.daemon``.
FACADE = frozenset({"ikos", "ikos.daemon"})
_TOP = len(LAYERS)


def layer_of(module: str) -> int | None:
    """The layer of an ``ikos`` module (-1: base, len(LAYERS): facade); None for others."""
    parts = module.split(".")
    if parts[0] != "ikos":
        return None
    if module in FACADE:
        return _TOP
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if ".".join(parts[:2]) in BASE:
        return -1
    raise AssertionError(f"{module} is in no layer: add it to LAYERS, BASE or FACADE")


def layer_name(layer: int) -> str:
    return "base" if layer < 0 else "facade" if layer == _TOP else LAYERS[layer]


def module_name(path: Path) -> str:
    parts = path.relative_to(IKOS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def ikos_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(IKOS.rglob("*.py"))}


def imported(
    module: str, source: str, known: Collection[str], *, package: bool = False
) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``, the module of ``module``.

    ``from x import y`` reaches ``x.y`` when that is a module of ``known``,
    else ``x``; relative imports are resolved against the module's package
    (``package``: the module is a package's ``__init__``).
    """
    here = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here[: len(here) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield node.lineno, full if full in known else base


def violations(
    module: str, source: str, known: Collection[str], path: str = "", *, package: bool = False
) -> list[str]:
    """One line per import of a layer above ``module``'s own."""
    own = layer_of(module)
    assert own is not None, module
    found = []
    for line, target in sorted(set(imported(module, source, known, package=package))):
        reached = layer_of(target)
        if reached is not None and reached > own:
            found.append(
                f"{path or module}:{line}: {module} ({layer_name(own)}) imports "
                f"{target} ({layer_name(reached)})"
            )
    return found


def test_no_module_imports_a_higher_layer() -> None:
    modules = ikos_modules()
    found = []
    for module, path in modules.items():
        rel = str(path.relative_to(IKOS.parent))
        found += violations(
            module, path.read_text(), modules, rel, package=path.name == "__init__.py"
        )
    assert not found, "imports of a higher layer:\n" + "\n".join(found)


def test_every_module_has_a_layer() -> None:
    for module in ikos_modules():
        assert layer_of(module) is not None, module


KNOWN = {"ikos", "ikos.daemon", "ikos._errors", "ikos.supervision", "ikos.supervision._spec"}


@pytest.mark.parametrize(
    ("module", "source", "reached"),
    [
        # a function-level import counts
        (
            "ikos.platform._x",
            "def f():\n    from ikos.supervision._spec import Exec\n",
            "supervision",
        ),
        ("ikos.registry._x", "import ikos.supervision._spec\n", "supervision"),
        ("ikos.registry._x", "from ikos.supervision import _spec\n", "supervision"),
        # relative: ..supervision from ikos.registry._x is ikos.supervision
        ("ikos.registry._x", "from ..supervision._spec import Exec\n", "supervision"),
        ("ikos.manager._x", "from ikos import __version__\n", "facade"),
        ("ikos.supervision._x", "from ikos import daemon\n", "facade"),
        ("ikos.cli._x", "import ikos\n", "facade"),
        # under TYPE_CHECKING it is still a dependency of the design
        (
            "ikos.actors._x",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ikos.manager._m\n",
            "manager",
        ),
    ],
)
def test_the_checker_catches_an_import_of_a_higher_layer(
    module: str, source: str, reached: str
) -> None:
    found = violations(module, source, KNOWN)
    assert len(found) == 1, found
    assert found[0].endswith(f"({reached})")


def test_the_checker_lets_lower_and_same_layers_pass() -> None:
    source = (
        "import os\n"
        "from ikos._errors import SpecError\n"
        "from ikos.platform import _spawn\n"
        "from . import _runtime\n"
        "def f():\n"
        "    import ikos.actors._actor\n"
    )
    assert violations("ikos.supervision._x", source, KNOWN) == []
    assert violations("ikos.daemon", "import ikos.manager._manager\n", KNOWN) == []
    # a package's __init__ resolves `.` to itself
    assert violations("ikos.registry", "from ._graph import x\n", KNOWN, package=True) == []


def test_a_module_outside_every_layer_is_named() -> None:
    with pytest.raises(AssertionError, match=r"ikos\._helpers is in no layer"):
        layer_of("ikos._helpers")
