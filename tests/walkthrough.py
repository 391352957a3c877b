"""Documentation that runs: the ```console blocks of a Markdown file, executed and checked.

Not a test module: ``tests/test_docs_walkthroughs.py`` (``docs/examples.md``)
and ``tests/test_tutorial.py`` (``docs/tutorial.md``) use it, so that every
command a reader is told to type is typed, and what the page says will be
printed is what gets printed.

The convention of the pages, kept small enough to read at a glance:

- In a ```console block, a line ``$ COMMAND`` is a command; the lines after
  it, up to the next ``$``, are its output. ``...`` inside a line stands for
  any text (a PID, a time); a line that is just ``...`` for any number of
  lines. Otherwise the output must be those lines, in order, exactly, but
  for blanks: a run of them compares as one, and none at either end of a
  line (a table's columns widen with a longer PID).
- A command ending in `` &`` runs in the background, as a shell job: the
  lines shown after it are what it prints on stdout (ikosd's ready line),
  awaited until they appear. ``kill %N`` and ``wait`` / ``wait %N`` name the
  jobs as bash does (``%N`` becomes the job's PID; ``wait %N`` waits for
  job N, ``wait`` for all, and ``$?`` is the exit status of the last).
- ``<!-- file: NAME -->`` just before a fenced block writes the block to
  the file NAME: the page's "save this as NAME".
- Every other command runs with ``bash -c`` in the session's working
  directory and environment, and the changes it makes to them (``cd``,
  ``export``, ``. venv/bin/activate``) carry over to the next command, as in
  a terminal. It must exit with status 0 (a page that shows a failure says
  ``|| echo ...`` or ``echo $?``, as a reader would), except a reading
  command (below), judged by what it prints. It runs on a pseudo-terminal,
  as a reader's commands do (ikosctl prints tables there, tab-separated
  rows on a pipe), stdout and stderr interleaved.
- What a supervisor does after a kill takes a moment: a command that only
  reads (``ikosctl status``, ``tree``, ``list``..., ``curl``, ``grep``) is run again,
  for a while, until its output is the one shown, as a reader would run it
  again; any other command runs once.

Paths and ports a page names (``/tmp/trees``, ``9090``) are replaced by the
test's own (``substitutions``), so that walkthroughs run side by side.
Every process started carries ``IKOS_TEST_MARK``; whatever outlives the
walkthrough fails it and is killed (``conftest.kill_and_check``).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BIN, kill_and_check

#: How long a background job may take to print what the page shows, a reading
#: command to show what the page shows, a command to finish: bounds on hangs.
PATIENCE = 90.0
RETRY_INTERVAL = 0.3
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: The width of the terminal the commands run on.
COLUMNS = 120

#: Commands that only read, run again until their output is the one shown.
READING = re.compile(
    r"^(ikosctl(\s+--(root|json)(\s+\S+)?)*\s+(--json\s+)?"
    r"(status|tree|list|services|discover|is-active|logs|alerts|top)\b"
    r"|curl\s|grep\s|promtool\s+query\s)"
)
#: What the shell itself sets, not carried from one command to the next.
SHELL_OWN = ("PWD", "OLDPWD", "SHLVL", "_")


@dataclass
class Step:
    """One ``$ command`` of a page with the output shown under it."""

    command: str
    expected: list[str]
    line: int  # where it is in the page, for a failure message


@dataclass
class FileBlock:
    """A fenced block the page asks the reader to save as ``name``."""

    name: str
    text: str
    line: int


@dataclass
class Walkthrough:
    """The steps (and files) of one section of a page, in order."""

    title: str
    steps: list[Step | FileBlock] = field(default_factory=list)


FENCE = re.compile(r"^```(\w*)\s*$")
FILE_MARK = re.compile(r"^<!--\s*file:\s*(\S+)\s*-->\s*$")


def parse(text: str, *, top_heading: str | None = None) -> list[Walkthrough]:
    """The walkthroughs of a page: one per ``## `` section holding console blocks.

    With ``top_heading``, only the ``## `` sections under the ``# top_heading``
    part of the page count (a page may hold other parts, with other
    conventions); without, the page as a whole is one walkthrough.
    """
    lines = text.splitlines()
    walks: list[Walkthrough] = []
    current: Walkthrough | None = None if top_heading else Walkthrough("page")
    inside = top_heading is None
    i = 0
    pending_file: str | None = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("# ") and top_heading is not None:
            inside = line[2:].strip() == top_heading
            current = None
        elif line.startswith("## ") and top_heading is not None and inside:
            current = Walkthrough(line[3:].strip())
            walks.append(current)
        mark = FILE_MARK.match(line)
        if mark:
            pending_file = mark.group(1)
        fence = FENCE.match(line)
        if fence:
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if inside and current is not None:
                if pending_file is not None:
                    current.steps.append(FileBlock(pending_file, "\n".join(body) + "\n", start + 1))
                elif fence.group(1) == "console":
                    current.steps.extend(_steps(body, start + 2))
            pending_file = None
        i += 1
    if top_heading is None and current is not None:
        walks.append(current)
    return [w for w in walks if any(isinstance(s, Step) for s in w.steps)]


def _steps(body: list[str], first_line: int) -> Iterator[Step]:
    step: Step | None = None
    for offset, line in enumerate(body):
        if line.startswith("$ "):
            if step is not None:
                yield _trimmed(step)
            step = Step(line[2:].strip(), [], first_line + offset)
        elif step is not None:
            step.expected.append(line.rstrip())
        elif line.strip():
            raise ValueError(f"line {first_line + offset}: output before any '$ command': {line!r}")
    if step is not None:
        yield _trimmed(step)


def _trimmed(step: Step) -> Step:
    while step.expected and not step.expected[-1].strip():
        step.expected.pop()
    return step


def matches(expected: list[str], output: str) -> bool:
    """Whether ``output`` has the shape ``expected`` shows (``...`` elides, see the module).

    A run of blanks compares as one blank, and leading and trailing blanks not
    at all: a table's columns widen with what they hold (a longer PID).
    """
    pattern = ""
    for line in expected:
        if line.strip() == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            parts = (re.escape(p) for p in _blanks(line).split("..."))
            pattern += "[^\n]*?".join(parts) + "\n"
    text = "".join(_blanks(ln) + "\n" for ln in output.splitlines())
    return re.fullmatch(pattern, text) is not None


def _blanks(line: str) -> str:
    return re.sub(r"[ \t]+", " ", line.strip())


class Session:
    """A terminal session: working directory, environment, background jobs."""

    def __init__(
        self,
        cwd: Path,
        scratch: Path,
        substitutions: Mapping[str, str],
        *,
        activated: bool = True,
        reading: re.Pattern[str] = READING,
    ) -> None:
        self.cwd = cwd
        self.scratch = scratch
        self.subs = dict(substitutions)
        self.mark = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k not in ("IKOS_ROOT", "VIRTUAL_ENV")}
        if activated:  # the reader's shell has ikos's commands on PATH (the venv activated)
            env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        else:  # a shell before any venv: the system's commands
            env["PATH"] = os.pathsep.join(
                p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN
            )
        self.reading = reading
        env["IKOS_TEST_MARK"] = self.mark
        env["NO_COLOR"] = "1"
        self.env = env
        self.jobs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.transcript: list[str] = []

    # -- running -------------------------------------------------------------

    def substitute(self, text: str) -> str:
        for old, new in self.subs.items():
            text = text.replace(old, new)
        return text

    def run(self, walk: Walkthrough) -> None:
        """Run every step of ``walk``; fail the test at the first that does not match."""
        for step in walk.steps:
            if isinstance(step, FileBlock):
                path = self.cwd / step.name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self.substitute(step.text))
                self.transcript.append(f"(saved {step.name})")
                continue
            command = self.substitute(step.command)
            expected = [self.substitute(line) for line in step.expected]
            self.transcript.append(f"$ {command}")
            if command.endswith("&") and not command.endswith("&&"):
                self._background(step, command[:-1].strip(), expected)
            else:
                self._foreground(step, command, expected)

    def _background(self, step: Step, command: str, expected: list[str]) -> None:
        n = len(self.jobs)
        out = self.scratch / f"job{n + 1}.out"
        err = self.scratch / f"job{n + 1}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        self.jobs.append((proc, err))
        deadline = time.monotonic() + PATIENCE
        while True:
            text = out.read_text(errors="replace")
            if not expected or matches(expected, text):
                self.transcript.append(text.rstrip())
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                self._fail(step, expected, text, f"(job exited {proc.returncode})")
            time.sleep(0.05)

    def _job_pids(self, command: str) -> str:
        def pid(m: re.Match[str]) -> str:
            return str(self.jobs[int(m.group(1)) - 1][0].pid)

        return re.sub(r"%(\d+)", pid, command)

    def _foreground(self, step: Step, command: str, expected: list[str]) -> None:
        waited = re.match(r"^wait(?:\s+%(\d+))?(?=\s*($|;|&&|\|\|))", command)
        if waited:
            # `wait %N` waits for job N, `wait` for every job; $? is the (last) one's status
            number = waited.group(1)
            jobs = [self.jobs[int(number) - 1]] if number else self.jobs
            status = 0
            for proc, _ in jobs:
                try:
                    status = proc.wait(timeout=PATIENCE)
                except subprocess.TimeoutExpired:
                    self._fail(step, expected, "", f"(job {proc.args} did not exit)")
            command = f"(exit {status})" + command[waited.end() :]
        command = self._job_pids(command)
        reading = self.reading.match(command) is not None
        deadline = time.monotonic() + PATIENCE
        while True:
            status, output = self._bash(command)
            # A reading command is judged by what it shows (`status` of a daemon
            # that is not running exits 3, as systemctl's does); any other must succeed.
            ok = (status == 0 or reading) and matches(expected, output)
            if ok or not reading or time.monotonic() > deadline:
                break
            time.sleep(RETRY_INTERVAL)
        self.transcript.append(output.rstrip())
        if not ok:
            self._fail(step, expected, output, f"(exit status {status})")

    def _bash(self, command: str) -> tuple[int, str]:
        """Run ``command`` as the session's shell would; keep its cwd and environment."""
        env_file, cwd_file = self.scratch / "env", self.scratch / "cwd"
        script = f"{command}\n__rc=$?\nenv -0 > {env_file}; pwd > {cwd_file}\nexit $__rc\n"
        for stale in (env_file, cwd_file):
            stale.unlink(missing_ok=True)
        status, output = on_terminal(["bash", "-c", script], self.cwd, self.env)
        if env_file.exists() and cwd_file.exists():
            pairs = (e.partition("=") for e in env_file.read_text().split("\0") if e)
            self.env = {k: v for k, _, v in pairs if k not in SHELL_OWN}
            self.cwd = Path(cwd_file.read_text().strip())
        return status, output

    def _fail(self, step: Step, expected: list[str], got: str, why: str) -> None:
        pytest.fail(
            f"line {step.line}: $ {step.command}\n"
            f"expected:\n{_indent(chr(10).join(expected))}\n"
            f"got {why}:\n{_indent(got)}\n"
            f"session so far:\n{_indent(chr(10).join(self.transcript[-40:]))}"
            + "".join(
                f"\njob {i + 1} stderr (tail):\n{_indent(_tail(err))}"
                for i, (_, err) in enumerate(self.jobs)
            ),
            pytrace=False,
        )

    # -- the end -------------------------------------------------------------

    def close(self) -> str | None:
        """Stop what the walkthrough left running; what was left behind, or None.

        A job still running is a reader closing the terminal: SIGTERM to its
        session, as the terminal's hangup would reach it, and time to stop.
        """
        for proc, _ in self.jobs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=PATIENCE)
                except subprocess.TimeoutExpired:
                    pass
        return kill_and_check(self.mark, *(proc for proc, _ in self.jobs))


def on_terminal(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; its status and output.

    On a terminal is how a reader runs the page's commands, and ikosctl
    prints tables there (tab-separated rows on a pipe); the terminal is
    COLUMNS wide, stdin is /dev/null. The output is read until the command
    exited and nothing more comes, so that a process it left behind holding
    the terminal cannot hang the test (the leak check finds that process).
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + PATIENCE * 2
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every end of the terminal is closed
                    chunk = b""
                if chunk:
                    chunks.append(chunk)
                    continue
                break
            if proc.poll() is not None:
                break
        else:
            proc.kill()
        status = proc.wait(timeout=PATIENCE)
    finally:
        os.close(master)
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    return status, ANSI_ESCAPE.sub("", text)  # colours: invisible on the reader's screen


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"
