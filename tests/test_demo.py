"""The demo of ``make demo`` and the README's quick start, run as a user runs them.

``python -m examples.demo`` must tour a real ikosd and leave nothing behind,
whether it shuts down at once (``--once``, or stdin not a terminal) or
stays in the foreground on a terminal until Ctrl-C. The README's quick
start is executed as written: its ``mytree.py`` and its commands, one at a
time, each checked against what its comment promises.
"""

from __future__ import annotations

import os
import pwd
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import BIN, REPO, kill_marked, left_behind, read_line, wait_for

from ikos.cli._ikosctl import build_parser

README = REPO / "README.md"
READ_VERBS = {"status", "list", "tree", "is-active"}


def demo_env(mark: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("IKOS_ROOT", "NO_COLOR")}
    env.update(IKOS_TEST_MARK=mark, PYTHONPATH=str(REPO))
    return env


def check_tour(out: str, root: Path) -> None:
    # the 4 system daemons, the 5 of the application and the IPC broker
    assert "ikosd ready: 10 daemons running" in out
    assert re.search(r"^root \[supervisor one_for_one\] running$", out, re.M), out
    # the example system, with the dependencies that make its waves
    assert re.search(r"^├─ system \[supervisor one_for_one\] running$", out, re.M), out
    assert re.search(r"^│  ├─ dev \[actor\] running \d+$", out, re.M), out
    assert re.search(r"^│  ├─ log \[actor\] running \d+ \(requires auth\)$", out, re.M), out
    assert re.search(r"^│  └─ net \[actor\] running \d+ \(requires dev, auth\)$", out, re.M), out
    # a login, and a permission its user holds
    assert re.search(r'"ok": true, "user": "alice", "token": "[\w-]{40,}"', out), out
    assert '{"ok": true, "allowed": true, "user": "alice"}' in out
    # logger(1)'s line, queried back before and after the logger is killed
    assert out.count('"msg": "hello from logger(1)", "format": "rfc3164"') == 2, out
    moved = re.search(r"^log: pid (\d+) -> (\d+) \(restarts: 1\)", out, re.M)
    assert moved and moved.group(1) != moved.group(2), out
    assert '"subsystems": {' in out and '"name": "lo"' in out  # dev and net answered
    assert re.search(r"^├─ store \[actor\] running \d+$", out, re.M), out
    assert re.search(
        r"^└─ workers \[supervisor rest_for_one\] running \(requires store\)$", out, re.M
    ), out
    assert re.search(r"^   ├─ worker \[actor\] running \d+$", out, re.M), out
    assert "\nhello from ikos\n" in out  # the store answered the get
    assert "\n1\n" in out and "\n2\n" in out  # the counter counted
    moved = re.search(r"worker: pid (\d+) -> (\d+) \(restarts: 1\)", out)
    assert moved and moved.group(1) != moved.group(2), out
    assert "Last exit: killed by SIGKILL" in out
    assert str(root / "run/ikos/ikosd.sock") in out
    assert str(root / "var/log/ikos/ikosd.log") in out
    assert out.rstrip().endswith("ikosd exited with status 0")
    # The commands it suggests exist, with the demo's root.
    suggested = [ln.strip() for ln in out.splitlines() if ln.startswith("    .venv/bin/ikosctl")]
    assert len(suggested) >= 5, out
    parser = build_parser()
    for line in suggested:
        argv = shlex.split(line, comments=True)
        assert argv[1:3] == ["--root", str(root)], line
        parser.parse_args(argv[1:])  # raises on a verb or option that does not exist


@pytest.mark.parametrize("once", [True, False], ids=["--once", "stdin-not-a-tty"])
def test_demo_tours_and_shuts_down(tmp_path: Path, once: bool) -> None:
    root = tmp_path / "demo"
    mark = uuid.uuid4().hex
    try:
        res = subprocess.run(
            [sys.executable, "-m", "examples.demo", "--root", str(root)]
            + (["--once"] if once else []),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=demo_env(mark),
            stdin=subprocess.DEVNULL,
            timeout=180,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        check_tour(res.stdout, root)
        assert "Traceback" not in res.stderr
        assert (left := left_behind(mark)) is None, left
        assert not (root / "run/ikos/ikosd.sock").exists()
        assert "actor worker: running -> failed" in (root / "var/log/ikos/ikosd.log").read_text()
    finally:
        kill_marked(mark)


def test_demo_piped_to_head_says_its_output_closed(tmp_path: Path) -> None:
    """``make demo | head``: the reader leaves early; the demo says so and stops ikosd."""
    root = tmp_path / "demo"
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.demo", "--root", str(root), "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=demo_env(mark),
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for _ in range(5):  # as `head -5` does: read five lines, then close
            read_line(proc.stdout, 120)
        proc.stdout.close()
        assert proc.wait(timeout=120) == 0
        err = proc.stderr.read().decode()
        assert "demo: the output was closed" in err, err
        assert "failed with status" not in err and "Traceback" not in err, err
        assert (left := left_behind(mark)) is None, left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        kill_marked(mark)


def as_nobody(*argv: str) -> list[str]:
    nobody = pwd.getpwnam("nobody")
    return [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
        *argv,
    ]


def runs_as_nobody(python: str) -> bool:
    """Whether nobody may run ``python`` and import ikos's dependencies and the demo with it.

    Through ``sh``: setpriv itself still holds root's capabilities when it
    looks the program up, which nobody's own processes do not.
    """
    code = "import psutil, networkx, argon2, pyroute2, examples.demo"
    res = subprocess.run(
        as_nobody("sh", "-c", f"exec {shlex.quote(python)} -c {shlex.quote(code)}"),
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": "/"},
        capture_output=True,
    )
    return res.returncode == 0


def python_for_nobody(base: Path) -> str | None:
    """A Python nobody may run with this venv's packages: this one, or Debian's beside it.

    A Python built under /root (pyenv) is out of nobody's reach, as it would be
    for any user but root; Debian's python3 of the same version, in a venv that
    also reads this venv's site-packages, is what such a user would run.
    """
    if runs_as_nobody(sys.executable):
        return sys.executable
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        return None
    venv = base / "venv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = (venv / "lib").glob("python3.*/site-packages")
    ours = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
    (site / "ikos-test.pth").write_text("\n".join(ours) + "\n")
    subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    return python if runs_as_nobody(python) else None


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run the demo as another user",
)
def test_demo_runs_without_root() -> None:
    """As ``nobody`` the whole tour still runs; what needs root says so, nothing stays behind."""
    base = Path(tempfile.mkdtemp(prefix="ikos-demo-nobody-"))
    os.chmod(base, 0o755)
    try:
        python = python_for_nobody(base)
        if python is None:
            pytest.skip("no Python here that the user nobody may run with ikos's dependencies")
        home = base / "home"
        home.mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        root = home / "demo"
        mark = uuid.uuid4().hex
        env = demo_env(mark)
        env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
        try:
            res = subprocess.run(
                as_nobody(python, "-m", "examples.demo", "--root", str(root), "--once"),
                capture_output=True,
                text=True,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                timeout=180,
            )
            assert res.returncode == 0, res.stdout + res.stderr
            check_tour(res.stdout, root)
            assert "Running without root" in res.stdout, res.stdout
            assert "CAP_NET_ADMIN is missing" in res.stdout, res.stdout
            assert "Traceback" not in res.stderr
            assert (left := left_behind(mark)) is None, left
        finally:
            kill_marked(mark)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_demo_on_a_terminal_runs_until_ctrl_c(tmp_path: Path) -> None:
    import pty

    root = tmp_path / "demo"
    mark = uuid.uuid4().hex
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.demo", "--root", str(root)],
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        cwd=REPO,
        env=demo_env(mark),
    )
    os.close(child_fd)
    output = bytearray()

    def read_available(wait: float) -> None:
        ready, _, _ = select.select([main_fd], [], [], wait)
        if ready:
            try:
                output.extend(os.read(main_fd, 65536))
            except OSError:  # EIO once the child closed the terminal
                pass

    try:

        def prompted() -> bool:
            read_available(0.05)
            return b"press Ctrl-C" in output

        wait_for(prompted, 120, message="the demo's Ctrl-C prompt")
        # The tour is over and ikosd keeps running in the foreground.
        assert proc.poll() is None
        res = subprocess.run(
            [str(BIN / "ikosctl"), "--root", str(root), "is-active", "store"],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert proc.wait(timeout=120) == 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and b"ikosd exited with status 0" not in output:
            read_available(0.1)
        text = output.decode(errors="replace")
        assert "ikosd exited with status 0" in text, text
        assert (left := left_behind(mark)) is None, left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main_fd)
        kill_marked(mark)


def test_make_demo_runs_the_demo() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t\$\(PY\) -m examples\.demo --root \.demo$", makefile, re.M)


# -- the README's quick start ------------------------------------------------------


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def quick_start() -> tuple[str, list[str], str]:
    """(mytree.py, the shell lines, the client snippet) of the README's quick start."""
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    tree_src, client_src = code_blocks(section, "python")
    [shell] = code_blocks(section, "sh")
    lines = [ln for ln in shell.splitlines() if ln.strip()]
    return tree_src, lines, client_src


def expectations(line: str) -> list[str]:
    """What a command's comment promises to print: quoted text, or ``key: value`` items."""
    if "#" not in line:
        return []
    comment = line.split("#", 1)[1].strip()
    quoted = re.findall(r'"([^"]+)"', comment)
    if quoted:
        return quoted
    if ":" in comment:
        return [item.strip() for item in comment.split(",")]
    return []


def shows(output: str, expected: str) -> bool:
    flat = " ".join(output.split()).lower()
    return " ".join(expected.split()).lower() in flat


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_readme_quick_start_works_as_written(tmp_path: Path) -> None:
    tree_src, lines, client_src = quick_start()
    root = str(tmp_path / "demo")
    (tmp_path / "mytree.py").write_text(tree_src)
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("IKOS_ROOT", "NO_COLOR")}
    env.update(IKOS_TEST_MARK=mark, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    ikosd: subprocess.Popen[str] | None = None

    def sh(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
        )

    try:
        assert lines[0] == ". .venv/bin/activate"  # stood for by PATH above
        ran_client = False
        for line in lines[1:]:
            command = line.split("#", 1)[0].strip().replace("/tmp/demo", root)
            promised = expectations(line)
            if command.startswith("ikosd ") and command.endswith("&"):
                ikosd = subprocess.Popen(
                    ["bash", "-c", "exec " + command.rstrip("&")],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    cwd=tmp_path,
                    env=env,
                )
                assert ikosd.stdout is not None
                ready = read_line(ikosd.stdout)
                for text in promised:
                    assert shows(ready, text), (line, ready)
                continue
            assert command.startswith("ikosctl "), line
            argv = shlex.split(command)
            if "shutdown" in argv:
                # The client snippet runs while ikosd is up, before the shutdown.
                client = subprocess.run(
                    [sys.executable, "-c", client_src.replace("/tmp/demo", root)],
                    capture_output=True,
                    text=True,
                    cwd=tmp_path,
                    env=env,
                    timeout=60,
                )
                assert client.returncode == 0, client.stderr
                assert "hello grace, you are visitor" in client.stdout
                ran_client = True

            def fulfilled(
                command: str = command, promised: list[str] = promised
            ) -> subprocess.CompletedProcess[str] | None:
                res = sh(command)
                if res.returncode == 0 and all(shows(res.stdout, p) for p in promised):
                    return res
                return None

            if READ_VERBS & set(argv):
                # A user reads the answer when it is there: a restart takes a moment.
                wait_for(fulfilled, 30, message=f"{command!r} to print {promised}")
            else:  # not repeatable (a call counts, a kill kills): once
                assert fulfilled(), (line, sh(command))
        assert ran_client
        assert ikosd is not None
        assert ikosd.wait(timeout=60) == 0
        assert (left := left_behind(mark)) is None, left
    finally:
        if ikosd is not None:
            if ikosd.poll() is None:
                ikosd.terminate()
                ikosd.wait(timeout=60)
            assert ikosd.stdout is not None
            ikosd.stdout.close()
        kill_marked(mark)
