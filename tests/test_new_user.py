"""What a new user hits first (issue 7, items 16-18), tried as they would try it.

``ikosd -c ikos.toml`` from the top of the checkout with an actor named by
import path; ikosd on a terminal (a real pseudo-terminal); ``ikosctl logs``
of an actor that prints.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
import uuid
from pathlib import Path

from conftest import IKOSCTL, IKOSD, REPO, kill_and_check, read_line, wait_for

CONFIG = """
[actors.echo]
class = "examples.actors:Echo"
"""


def test_a_config_file_finds_actors_from_the_checkout(tmp_path: Path) -> None:
    """Item 16: ``ikosd -c ikos.toml`` from the repository's top, as the docs say."""
    config = tmp_path / "ikos.toml"
    config.write_text(CONFIG)
    root = tmp_path / "root"
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["IKOS_TEST_MARK"] = mark
    proc = subprocess.Popen(
        [IKOSD, "--root", str(root), "-c", str(config), "--metrics", "off"],
        cwd=REPO,  # examples/ is importable from here, and only from here
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = read_line(proc.stdout)
        # echo (the IPC broker waits for its first connection)
        assert line.startswith("ikosd ready: 1 daemon running"), (line, proc.stderr)
        res = subprocess.run(
            [IKOSCTL, "--root", str(root), "call", "echo", '"hi"'],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert res.stdout == "hi\n", res.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        finally:
            left = kill_and_check(mark, proc)
    assert proc.returncode == 0
    assert left is None, left


def test_on_a_terminal_only_warnings_and_the_ready_line(tmp_path: Path) -> None:
    """Item 17: the README's "one ikosd ready line": INFO lines go to the file only."""
    (tmp_path / "t.py").write_text(
        "import ikos\n"
        "from examples.actors import Echo\n"
        "tree = ikos.Supervisor('root', children=[ikos.Child('echo', Echo)])\n"
    )
    root = tmp_path / "root"
    mark = uuid.uuid4().hex
    env = {**os.environ, "IKOS_TEST_MARK": mark, "PYTHONPATH": str(REPO)}
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [IKOSD, "--root", str(root), "--tree", f"{tmp_path / 't.py'}:tree", "--metrics", "off"],
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
        env=env,
        cwd=tmp_path,
    )
    os.close(secondary)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"ikosd ready" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1)
            if ready:
                try:
                    seen += os.read(primary, 65536)
                except OSError:
                    break
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # what was printed while stopping
            ready, _, _ = select.select([primary], [], [], 0.5)
            if not ready:
                break
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(primary)
        left = kill_and_check(mark, proc)
    assert proc.returncode == 0
    assert left is None, left
    lines = [ln for ln in seen.decode(errors="replace").splitlines() if ln.strip()]
    assert [ln for ln in lines if "ikosd ready" in ln], lines
    assert not [ln for ln in lines if " INFO " in ln or " DEBUG " in ln], lines
    assert len(lines) == 1, lines
    log = (root / "var" / "log" / "ikos" / "ikosd.log").read_text()
    assert "actor echo: starting -> running" in log  # the full story is in the file
    assert (root / "var" / "log" / "ikos" / "ikosd.log").stat().st_mode & 0o077 == 0


PRINTING = """
import sys
import ikos


class Loud(ikos.Actor):
    def on_start(self):
        print("hello from on_start")

    def receive(self, message):
        print(f"got {message}")
        print(f"to stderr {message}", file=sys.stderr)
        return message


tree = ikos.Supervisor("root", children=[ikos.Child("loud", Loud)])
"""


def test_an_actors_output_is_in_its_log(ikosd_factory: object) -> None:
    """Item 18: ``ikosctl logs ACTOR`` shows what the actor printed, stdout and stderr."""
    inst = ikosd_factory(tree=PRINTING)  # type: ignore[operator]
    assert inst.ctl("call", "loud", '"ping"').stdout == "ping\n"

    def logged() -> str:
        return str(inst.ctl("logs", "-n", "10", "loud").stdout)

    text = wait_for(lambda: "got ping" in logged() and "to stderr ping" in logged() and logged())
    assert "hello from on_start" in text
    assert (inst.root / "var" / "log" / "ikos" / "loud.log").exists()
