"""The sdist and the wheel as users meet them: built, checked, installed, run.

Each distribution is installed into its own fresh venv (no site packages, no
checkout on ``sys.path``, run from a directory outside it) and must give the
commands ``ikosd`` and ``ikosctl``, the importable ``ikos`` at the version
pyproject.toml declares, with ``py.typed``, and a working manager: a real
ikosd from that venv runs a tree, answers ikosctl and serves metrics.

Speed without cheating: the distributions are the ones ``make test`` just built
(it passes their directory in ``IKOS_TEST_DIST_DIR``), else this module builds
them itself; the dependencies (and setuptools, to build the sdist) are fetched
from PyPI once per session into a wheelhouse, through pip's cache, and each
venv is created without pip and filled by this interpreter's pip
(``pip --python VENV``), which skips two ensurepip runs and leaves the venv as
clean as a user's.
"""

from __future__ import annotations

import email
import email.message
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import trove_classifiers
from conftest import REPO, kill_and_check, wait_for

pytestmark = pytest.mark.slow  # builds, installs from PyPI's cache, starts ikosd

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
VERSION = PROJECT["version"]
#: What git tracks but the sdist leaves out on purpose (MANIFEST.in says why).
NOT_IN_SDIST = (".gitignore", ".ci/")


def run(cmd: list[str], *, cwd: Path | None = None, timeout: float = 300) -> str:
    """Run ``cmd``; return its stdout, or fail with everything it printed."""
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=cwd, env=clean_env(), timeout=timeout
    )
    assert res.returncode == 0, f"{cmd} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would point a process at the checkout or its venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "IKOS_ROOT", "IKOS_TEST_DIST_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]


def git_files() -> list[str] | None:
    """The checkout's files as git sees them (tracked or not ignored), None outside git."""
    if shutil.which("git") is None:
        return None
    res = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        return None
    return [name for name in res.stdout.split("\0") if name and (REPO / name).exists()]


def copy_of_checkout(dest: Path) -> Path:
    """``dest`` filled with the checkout as git sees it: no build by-products.

    A build in the checkout itself would read a stale ``ikos.egg-info/SOURCES.txt``
    left by an earlier build or the editable install, which setuptools merges
    into the sdist's file list, hiding a MANIFEST.in that misses something.
    Outside a git checkout (an unpacked sdist, say) the tree itself is the source.
    """
    files = git_files()
    if files is None:
        return REPO
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    return dest


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """The sdist and wheel: ``make test``'s (``IKOS_TEST_DIST_DIR``), else built here."""
    given = os.environ.get("IKOS_TEST_DIST_DIR")
    if given:
        outdir = Path(given)
    else:
        source = copy_of_checkout(tmp_path_factory.mktemp("source"))
        outdir = tmp_path_factory.mktemp("dist")
        run([sys.executable, "-m", "build", "--quiet", "--outdir", str(outdir), str(source)])
    found = Dists(outdir / f"ikos-{VERSION}.tar.gz", outdir / f"ikos-{VERSION}-py3-none-any.whl")
    for path in (found.sdist, found.wheel):
        assert path.is_file(), f"{path.name} not in {outdir}: {sorted(os.listdir(outdir))}"
    return found


@pytest.fixture(scope="session")
def wheelhouse(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ikos's dependencies and build requirements, downloaded once for every venv."""
    house = tmp_path_factory.mktemp("wheelhouse")
    run(pip("download", "--dest", str(house), str(dists.wheel), *build_requires()))
    return house


def build_requires() -> list[str]:
    return list(PYPROJECT["build-system"]["requires"])


@pytest.fixture(scope="session", params=["wheel", "sdist"])
def venv(
    request: pytest.FixtureRequest,
    dists: Dists,
    wheelhouse: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A fresh venv with one distribution installed (and nothing from the checkout)."""
    dist = dists.wheel if request.param == "wheel" else dists.sdist
    path = tmp_path_factory.mktemp(f"venv-{request.param}")
    run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    # From the sdist pip builds a wheel in isolation: setuptools comes from the wheelhouse.
    python = str(path / "bin/python")
    run(
        pip("--python", python, "install", "--no-index", "--find-links", str(wheelhouse), str(dist))
    )
    return path


def test_commands_print_their_usage(venv: Path, tmp_path: Path) -> None:
    for command in ("ikosd", "ikosctl"):
        out = run([str(venv / "bin" / command), "--help"], cwd=tmp_path)
        assert out.startswith(f"usage: {command} "), out


def test_installed_ikos_is_the_distribution_at_pyproject_version(
    venv: Path, tmp_path: Path
) -> None:
    probe = textwrap.dedent(
        """
        import importlib.metadata, pathlib, ikos
        here = pathlib.Path(ikos.__file__).parent
        print(ikos.__version__, importlib.metadata.version("ikos"))
        print(here)
        print((here / "py.typed").is_file())
        """
    )
    out = run([str(venv / "bin/python"), "-c", probe], cwd=tmp_path).split("\n")
    assert out[0] == f"{VERSION} {VERSION}", out
    installed = Path(out[1])
    assert installed.is_relative_to(venv / "lib"), f"ikos imported from {installed}, not the venv"
    assert out[2] == "True", "py.typed missing from the installed package"


#: Metrics on a port of the kernel's choosing: instances side by side never collide.
METRICS = ("--metrics", "127.0.0.1:0")
TREE = """
import ikos


class Echo(ikos.Actor):
    def receive(self, message):
        return message


tree = ikos.Supervisor("root", children=[ikos.Child("echo", Echo)])
"""


def test_installed_ikosd_runs_a_tree(venv: Path, tmp_path: Path) -> None:
    (tmp_path / "tree.py").write_text(TREE)
    root = tmp_path / "root"
    mark = uuid.uuid4().hex
    out_path = tmp_path / "ikosd.out"
    with open(out_path, "w") as out:
        ikosd = subprocess.Popen(
            [str(venv / "bin/ikosd"), "--root", str(root), "--tree", "tree.py:tree", *METRICS],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
            env=clean_env(IKOS_TEST_MARK=mark),
        )
    try:
        wait_for(
            lambda: "ikosd ready" in out_path.read_text() or ikosd.poll() is not None,
            60,
            message="ikosd's ready line",
        )
        text = out_path.read_text(errors="replace")
        assert ikosd.poll() is None, f"ikosd exited with {ikosd.returncode}:\n{text}"
        ready = re.search(r"ikosd ready: .* metrics (http://\S+/metrics)", text)
        assert ready, text
        ikosctl = [str(venv / "bin/ikosctl"), "--root", str(root)]
        assert run([*ikosctl, "call", "echo", '"hello"'], cwd=tmp_path).strip() == "hello"
        with urllib.request.urlopen(ready.group(1), timeout=30) as response:
            assert "ikos_daemon_up{" in response.read().decode()
        run([*ikosctl, "shutdown"], cwd=tmp_path)
        assert ikosd.wait(timeout=60) == 0, out_path.read_text(errors="replace")
    finally:
        left = kill_and_check(mark, ikosd)
    assert left is None, left


def metadata_of_wheel(wheel: Path) -> tuple[email.message.Message, list[str]]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = email.message_from_bytes(zf.read(f"ikos-{VERSION}.dist-info/METADATA"))
    return meta, names


def test_wheel_metadata_says_what_pyproject_says(dists: Dists) -> None:
    meta, names = metadata_of_wheel(dists.wheel)
    assert meta["Name"] == "ikos" and meta["Version"] == VERSION
    assert meta["License-Expression"] == PROJECT.get("license") == "Apache-2.0 OR MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert f"ikos-{VERSION}.dist-info/licenses/LICENSE" in names
    assert meta["Requires-Python"] == PROJECT["requires-python"]
    classifiers = meta.get_all("Classifier") or []
    assert classifiers == PROJECT["classifiers"]
    unknown = [c for c in classifiers if c not in trove_classifiers.classifiers]
    assert not unknown, f"not trove classifiers: {unknown}"
    assert not [c for c in classifiers if c.startswith("License ::")], "PEP 639: no License ::"
    assert "Typing :: Typed" in classifiers and "ikos/py.typed" in names
    # One import package, no stray top-level modules (tests, examples, bench stay out).
    top = {n.split("/", 1)[0] for n in names} - {f"ikos-{VERSION}.dist-info"}
    assert top == {"ikos"}, top
    with zipfile.ZipFile(dists.wheel) as zf:
        entry_points = zf.read(f"ikos-{VERSION}.dist-info/entry_points.txt").decode()
    assert "ikosd = ikos.manager._ikosd:main" in entry_points
    assert "ikosctl = ikos.cli._ikosctl:main" in entry_points


def test_sdist_holds_the_source_tree(dists: Dists) -> None:
    """What git tracks (but .gitignore and .ci/) is in the sdist, so its tests can run."""
    tracked = git_files()  # and the files not added yet, but not the ignored ones
    if tracked is None:
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    prefix = f"ikos-{VERSION}/"
    with tarfile.open(dists.sdist) as tf:
        members = {m.name.removeprefix(prefix) for m in tf.getmembers() if m.isfile()}
    expected = {f for f in tracked if not f.startswith(NOT_IN_SDIST)}
    missing = sorted(expected - members)
    assert not missing, f"tracked but not in the sdist (add them to MANIFEST.in): {missing}"
    generated = {"PKG-INFO", "setup.cfg"}
    extra = sorted(m for m in members - expected - generated if not m.startswith("ikos.egg-info/"))
    assert not extra, f"in the sdist but ignored by git: {extra}"


def test_building_leaves_nothing_git_would_track(tmp_path: Path) -> None:
    """``pip wheel .`` and ``python -m build`` leave only what .gitignore ignores."""
    copy = copy_of_checkout(tmp_path)
    if copy == REPO:
        pytest.skip("not a git checkout")
    git = ["git", "-C", str(copy)]
    run(["git", "init", "-q", str(copy)])
    run([*git, "add", "-A"])  # what the checkout tracks, tracked here
    run(pip("wheel", "--no-deps", "."), cwd=copy)  # build/, *.egg-info/, the .whl here
    run([sys.executable, "-m", "build", "--quiet", "--sdist", "."], cwd=copy)  # dist/
    left = run([*git, "ls-files", "--others", "--exclude-standard"])
    assert left == "", f"a build left files .gitignore does not ignore:\n{left}"
    ignored = run([*git, "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"])
    assert {"build/", "dist/", f"ikos-{VERSION}-py3-none-any.whl"} <= set(ignored.split()), ignored
