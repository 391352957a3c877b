"""The walkthroughs of docs/examples.md, run as written against a real ikosd.

Each ``## `` section of the page's ``# Supervision-tree examples`` part is one
walkthrough (tests/walkthrough.py has the conventions): its commands run in
order, in a shell session of their own started in the checkout as the page
says, each on its own instance root (the page's ``/tmp/trees-NAME`` becomes
a temporary directory), and every output shown must be what is printed. A
walkthrough that leaves a process behind fails.

The test also keeps the page and ``examples/trees/`` together: every example
module has a walkthrough that runs it, and every walkthrough runs one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO
from walkthrough import Session, Step, Walkthrough, matches, parse

pytestmark = pytest.mark.slow  # a real ikosd per walkthrough

PAGE = REPO / "docs" / "examples.md"
#: The parts of the page (``# `` headings) whose ``## `` sections are walkthroughs
#: of examples/trees/; another part following the same conventions joins here.
PARTS = ("Supervision-tree examples",)
TREES = REPO / "examples" / "trees"
#: The roots the page uses; each walkthrough gets its own directory instead.
PAGE_ROOT = "/tmp/trees"

WALKTHROUGHS = [w for part in PARTS for w in parse(PAGE.read_text(), top_heading=part)]


def _example(walk: Walkthrough) -> str:
    """The example a walkthrough runs: the ``examples.trees.NAME`` or file it starts."""
    for step in walk.steps:
        if isinstance(step, Step):
            found = re.search(r"examples[./]trees[./](\w+)", step.command)
            if found:
                return found.group(1)
    raise AssertionError(f"walkthrough {walk.title!r} runs no example of examples/trees")


@pytest.mark.parametrize("walk", WALKTHROUGHS, ids=_example)
def test_walkthrough(walk: Walkthrough, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    session = Session(REPO, scratch, {PAGE_ROOT: str(tmp_path / "trees")})
    try:
        session.run(walk)
    finally:
        left = session.close()
    assert left is None, f"the walkthrough left processes behind: {left}"


def test_every_example_has_a_walkthrough() -> None:
    modules = {p.stem for p in TREES.glob("*.py") if not p.stem.startswith("_")}
    walked = {_example(w) for w in WALKTHROUGHS}
    assert modules == walked, f"no walkthrough: {modules - walked}; no module: {walked - modules}"


def test_the_matcher_elides_only_what_dots_stand_for() -> None:
    shown = ["b", "...", "    Restarts: 1", "   Last exit: killed by ... at ..."]
    printed = "b\n  Kind: actor\n    Restarts: 1\n   Last exit: killed by SIGKILL at 12:00\n"
    assert matches(shown, printed)
    assert not matches(shown, printed.replace("Restarts: 1", "Restarts: 0"))
    assert not matches(shown, printed + "an extra line\n")
    assert matches(["ikosd ready: ..., pid ..."], "ikosd ready: 4 daemons running, pid 12\n")
    assert not matches(["a ... b"], "a x\ny b\n"), "'...' inside a line stays on the line"
    assert matches([], "")
    assert not matches([], "something printed\n")
