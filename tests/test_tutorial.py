"""docs/tutorial.md, typed as a reader types it: from ``pip install`` to Grafana.

The page is one walkthrough (tests/walkthrough.py has the conventions), run
in an empty directory from a shell without ikos: a fresh venv made by the
system's ``python3 -m venv``, ikos installed into it by ``pip`` from the
wheel, the reader's ``mytree.py`` run by that venv's ``ikosd``, a real
Prometheus (Debian's ``prometheus``) scraping it and ``promtool`` querying
it, and the Grafana provisioning copied where a Grafana would read it.

What the page names is mapped to the test's own, and nothing else: the
checkout (``~/src/ikos``) is a directory holding the wheel in ``dist/``
(``make test``'s, passed in ``IKOS_TEST_DIST_DIR``, else built here from a
copy of the checkout) and a copy of ``grafana/``; Grafana's directories
(``/etc/grafana``, ``/var/lib/grafana``) are under the test's temporary
directory, made as Debian's package makes them; Prometheus listens on a free
port instead of 9090. Grafana itself is not run (it is not packaged for
Debian): its restart is the one step of the page not executed;
tests/test_grafana.py evaluates the dashboards' queries against a real
Prometheus, and this test checks that the files land where the provisioning
says the dashboards are.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from prometheus import PROMETHEUS, PROMTOOL, free_port, require
from walkthrough import READING, Session, parse

pytestmark = pytest.mark.slow  # a venv, pip, ikosd and Prometheus

PAGE = REPO / "docs" / "tutorial.md"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
WHEEL = f"ikos-{VERSION}-py3-none-any.whl"
#: The tutorial's guest book answers its names: a read, awaited like the others.
TUTORIAL_READING = re.compile(rf"{READING.pattern}|ikosctl call guestbook names$")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ikos's wheel: ``make test``'s, else built from a copy of the checkout."""
    given = os.environ.get("IKOS_TEST_DIST_DIR")
    if given and (Path(given) / WHEEL).is_file():
        return Path(given) / WHEEL
    from test_packaging import copy_of_checkout, run

    source = copy_of_checkout(tmp_path_factory.mktemp("source"))
    outdir = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--quiet", "--outdir", str(outdir), str(source)])
    return outdir / WHEEL


def test_tutorial(wheel: Path, tmp_path: Path) -> None:
    require(PROMETHEUS)
    require(PROMTOOL)
    checkout = tmp_path / "src" / "ikos"
    (checkout / "dist").mkdir(parents=True)
    shutil.copy(wheel, checkout / "dist" / WHEEL)
    shutil.copytree(REPO / "grafana", checkout / "grafana")
    etc, lib = tmp_path / "etc" / "grafana", tmp_path / "var" / "lib" / "grafana"
    for kind in ("datasources", "dashboards"):  # as Debian's grafana package has them
        (etc / "provisioning" / kind).mkdir(parents=True)
    lib.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    substitutions = {
        "~/src/ikos": str(checkout),
        "/etc/grafana": str(etc),
        "/var/lib/grafana": str(lib),
        "127.0.0.1:9090": f"127.0.0.1:{free_port()}",
    }
    [walk] = parse(PAGE.read_text())
    session = Session(work, scratch, substitutions, activated=False, reading=TUTORIAL_READING)
    try:
        session.run(walk)
    finally:
        left = session.close()
    assert left is None, f"the tutorial left processes behind: {left}"

    # The venv is the reader's: ikos came from the wheel, not from the checkout.
    installed = list((work / "venv" / "lib").glob("python3.*/site-packages/ikos/__init__.py"))
    assert installed, "ikos is not installed in the tutorial's venv"

    # Grafana would find the dashboards where the provisioning file says they are.
    provider = (etc / "provisioning" / "dashboards" / "ikos.yaml").read_text()
    assert re.search(r"^\s+path: /var/lib/grafana/dashboards/ikos$", provider, re.M), provider
    copied = sorted(p.name for p in (lib / "dashboards" / "ikos").glob("*.json"))
    assert copied == sorted(p.name for p in (REPO / "grafana" / "dashboards").glob("*.json"))
    # ... and its data source is the Prometheus the page runs.
    source = (etc / "provisioning" / "datasources" / "ikos.yaml").read_text()
    assert re.search(r"^\s+url: http://localhost:9090$", source, re.M), source
    assert "--web.listen-address=127.0.0.1:9090" in PAGE.read_text()
