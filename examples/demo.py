"""The ikos demo, run by ``make demo``: the example system under ikosd.

``python -m examples.demo --root .demo`` starts the real ``ikosd --root .demo
--tree examples.demo:tree`` as a subprocess, waits for its ready line, and
drives it with the real ``ikosctl`` as a user would. The tree holds the four
example system daemons of :mod:`examples.system` (``dev``, ``auth``, ``log``,
``net``, started in waves by their dependencies) and a small application
beside them (a store, a counter and a three-stage pipeline). The tour shows
the tree with its dependencies, logs a user in, sends a line with
``logger(1)`` and queries it back, lists devices and links, kills the logger
and a worker and shows their supervisors restarting them (``rest_for_one``
taking the later stages along), then prints where to look. On a terminal
ikosd then stays up until Ctrl-C; otherwise, or with ``--once``, the demo
shuts it down and exits with ikosd's exit status.

Without root the daemons still run: what needs a privilege (links up and
down, addresses, loading drivers) answers with the privilege it lacks.

The demo is a client, not a library user: everything goes through the
command line and the control socket, so what it prints is what a user
typing the same commands sees. ikosd runs in its own session, so a Ctrl-C
reaches the demo alone, which then stops ikosd in order and waits for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import ikos
from examples import system
from examples.actors import Counter, Crashy, Echo, Store

__all__ = ["Counter", "Crashy", "Echo", "Store", "main", "tree"]

REPO = Path(__file__).resolve().parent.parent

#: The demo system: the example system daemons under ``system``, then an application: a
#: store and a counter, and a three-stage pipeline of workers that needs the store. In
#: the pipeline a failure restarts the stage that failed and the stages after it
#: (``rest_for_one``), never the ones before. The demo's users hash cheaply (argon2id
#: at 8 MiB and one pass): a demo, not a production setting (docs/examples.md).
tree = ikos.Supervisor(
    "root",
    strategy="one_for_one",
    max_restarts=5,
    within=10,
    description="the ikos demo system",
    children=[
        system.supervisor(
            "system",
            auth={"argon2": {"time_cost": 1, "memory_cost": 8192, "parallelism": 1}},
        ),
        ikos.Child("store", Store, description="key-value store"),
        ikos.Child("counter", Counter, description="counts 'incr' messages"),
        ikos.Supervisor(
            "workers",
            strategy="rest_for_one",
            max_restarts=5,
            within=10,
            requires=["store"],
            description="a pipeline: ingest, work, report",
            children=[
                ikos.Child("ingest", Echo, description="first stage"),
                ikos.Child("worker", Crashy, description="crashes when asked to"),
                ikos.Child("report", Echo, description="last stage"),
            ],
        ),
    ],
)

READY_TIMEOUT = 60.0
RESTART_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 120.0


class DemoError(Exception):
    """Something the demo cannot go on from; the message says what."""


def _command(script: str, module: str) -> list[str]:
    """The installed console script next to this Python, else ``python -m module``."""
    path = Path(sys.executable).parent / script
    return [str(path)] if path.is_file() else [sys.executable, "-m", module]


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


class Demo:
    """One ikosd under ``root``, driven through ikosctl."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.ikosd = _command("ikosd", "ikos.manager._ikosd")
        self.ikosctl = _command("ikosctl", "ikos.cli._ikosctl")
        path = os.environ.get("PYTHONPATH")
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
        }
        self.env.pop("IKOS_ROOT", None)  # --root says where; a stray value must not
        self.console = self.root / "ikosd.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = ""

    # -- ikosd -------------------------------------------------------------

    def start(self) -> str:
        """Start ikosd and return its ready line."""
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [*self.ikosd, "--root", str(self.root), "--tree", "examples.demo:tree"]
        shown = ["ikosd", "--root", self.shown_root, "--tree", "examples.demo:tree"]
        print(f"$ {_quote(shown)} &", flush=True)
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            ready = self._ready_line()
            if ready:
                self.ready = ready
                return ready
            if self.proc.poll() is not None:
                raise DemoError(
                    f"ikosd exited with status {self.proc.returncode}:\n{self._console_tail()}"
                )
            time.sleep(0.05)
        raise DemoError(f"ikosd was not ready after {READY_TIMEOUT:g}s:\n{self._console_tail()}")

    def _ready_line(self) -> str | None:
        text = self.console.read_text(errors="replace")
        return next((ln for ln in text.splitlines() if ln.startswith("ikosd ready")), None)

    def _console_tail(self, lines: int = 20) -> str:
        text = self.console.read_text(errors="replace").splitlines()
        return "\n".join("    " + ln for ln in text[-lines:])

    def stop(self, *, signal_it: bool = True) -> int:
        """Shut ikosd down in order (if it still runs) and return its exit status.

        ``signal_it=False`` only waits: after ``ikosctl shutdown`` ikosd is
        already on its way out, and a SIGTERM in its last moments would kill it.
        """
        proc = self.proc
        if proc is None:
            return 0
        if signal_it and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            # ikosd enforces the daemons' own shutdown timeouts; one that
            # hangs beyond all of them is killed with its process group.
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    # -- ikosctl -----------------------------------------------------------

    def show(self, *args: str, capture: bool = False) -> str:
        """Run ``ikosctl --root ROOT ARGS`` in front of the user, output unchanged.

        ``capture`` also returns the output (on a terminal, only what is not
        captured keeps ikosctl's colours and tables).
        """
        print(f"\n$ {_quote(['ikosctl', '--root', self.shown_root, *args])}", flush=True)
        res = subprocess.run(
            [*self.ikosctl, "--root", str(self.root), *args],
            env=self.env,
            stdout=subprocess.PIPE if capture else None,
            text=True,
        )
        if capture:
            print(res.stdout, end="", flush=True)
        if res.returncode != 0:
            if _output_closed():
                raise OutputClosed
            raise DemoError(f"ikosctl {' '.join(args)} failed with status {res.returncode}")
        return res.stdout or ""

    def show_reply(self, *args: str) -> Any:
        """``show`` for a ``call`` whose JSON reply the tour goes on with: shown, and parsed."""
        return json.loads(self.show(*args, capture=True))

    def query(self, *args: str) -> Any:
        """``ikosctl --json ARGS``, parsed."""
        res = subprocess.run(
            [*self.ikosctl, "--root", str(self.root), "--json", *args],
            env=self.env,
            capture_output=True,
            text=True,
        )
        if res.returncode not in (0, 3):
            raise DemoError(res.stderr.strip() or f"ikosctl {' '.join(args)} failed")
        return json.loads(res.stdout)

    @property
    def shown_root(self) -> str:
        """The root as the user would type it: relative when under the working directory."""
        try:
            return str(self.root.relative_to(Path.cwd()))
        except ValueError:
            return str(self.root)

    def pids(self) -> dict[str, int | None]:
        return {s["name"]: s["pid"] for s in self.query("status")}

    def wait_restarted(self, name: str, old_pid: int | None) -> dict[str, Any]:
        deadline = time.monotonic() + RESTART_TIMEOUT
        while time.monotonic() < deadline:
            [status] = self.query("status", name)
            if status["state"] == "running" and status["pid"] not in (None, old_pid):
                return dict(status)
            time.sleep(0.05)
        raise DemoError(f"{name} did not come back within {RESTART_TIMEOUT:g}s")

    # -- the tour ----------------------------------------------------------

    def tour(self) -> None:
        heading("The supervision tree, with each daemon's dependencies")
        self.show("tree", "--deps")
        self.system_tour()

        heading("Asking actors (DATA is JSON when it parses, else a string)")
        self.show("call", "store", '["put", "greeting", "hello from ikos"]')
        self.show("call", "store", '["get", "greeting"]')
        self.show("call", "counter", "incr")
        self.show("call", "counter", "incr")
        self.show("call", "ingest", "any string comes back")

        heading("A worker dies; its supervisor restarts it")
        before = self.pids()
        self.show("kill", "-s", "SIGKILL", "worker")
        worker = self.wait_restarted("worker", before["worker"])
        self.wait_restarted("report", before["report"])
        after = self.pids()
        print(
            f"\nworker: pid {before['worker']} -> {worker['pid']} "
            f"(restarts: {worker['restarts']}). The workers supervisor is rest_for_one:\n"
            f"report, started after worker, restarted too (pid {before['report']} -> "
            f"{after['report']}); ingest kept pid {after['ingest']}, and the store and "
            f"counter were not touched.",
            flush=True,
        )
        self.show("status", "worker")
        self.show("list")

    def system_tour(self) -> None:
        heading("auth: a user, a login, a permission check")
        self.show(
            "call",
            "auth",
            '{"op": "add_user", "user": "alice", "password": "wonderland", '
            '"permissions": ["net.*"]}',
        )
        login = '{"op": "login", "user": "alice", "password": "wonderland"}'
        token = self.show_reply("call", "auth", login)["token"]
        self.show(
            "call", "auth", json.dumps({"op": "check", "token": token, "permission": "net.up"})
        )

        heading("log: logger(1) writes to the logger's syslog socket; a query finds it")
        sock = ikos_paths(self.root)["syslog"]
        self.run(["logger", "--socket", str(sock), "-t", "demo", "hello from logger(1)"])
        self.show("call", "log", '{"op": "query", "program": "demo"}')

        heading("dev and net: the devices of sysfs, the links of netlink")
        self.show("call", "dev", '{"op": "subsystems"}')
        self.show("call", "net", '{"op": "links"}')

        self.without_root()

        heading("A system daemon dies; its supervisor restarts it")
        before = self.pids()
        self.show("kill", "-s", "SIGKILL", "log")
        log = self.wait_restarted("log", before["log"])
        print(
            f"\nlog: pid {before['log']} -> {log['pid']} (restarts: {log['restarts']}). "
            f"The system supervisor is one_for_one: dev, auth and net kept their pids.\n"
            f"The record is in the logger's files, so the new incarnation finds it:",
            flush=True,
        )
        self.show("call", "log", '{"op": "query", "program": "demo"}')

    def without_root(self) -> None:
        """Without root, say what the daemons cannot do, in their own words; the tour goes on."""
        if os.geteuid() == 0:
            return
        heading("Running without root: what the daemons cannot do here, in their words")
        dev = self.query("call", "dev", '{"op": "stats"}')
        net = self.query("call", "net", '{"op": "status"}')
        print(f"  dev: kernel uevents: {dev.get('uevents')}; drivers: {dev.get('drivers')}")
        missing = net.get("missing")
        print(
            f"  net: {missing} is missing: links and addresses are read, not changed"
            if missing
            else "  net: links and addresses can be changed (the capability is there)"
        )
        print("  Everything else runs as it does for root.", flush=True)

    def run(self, argv: list[str]) -> None:
        """Run a command that is not ikosctl in front of the user (a missing one is skipped)."""
        shown = [argv[0], *(self.shown_path(a) for a in argv[1:])]
        print(f"\n$ {_quote(shown)}", flush=True)
        try:
            res = subprocess.run(argv, env=self.env)
        except FileNotFoundError:
            print(f"({argv[0]} is not installed here: skipped)", flush=True)
            return
        if res.returncode != 0:
            raise DemoError(f"{argv[0]} failed with status {res.returncode}")

    def shown_path(self, arg: str) -> str:
        """``arg``, relative to the working directory when it is a path under it."""
        if not arg.startswith("/"):
            return arg
        try:
            return str(Path(arg).relative_to(Path.cwd()))
        except ValueError:
            return arg

    def where_to_look(self) -> None:
        root = self.shown_root
        paths = ikos_paths(self.root)
        heading("Where to look")
        print(f"  control socket  {paths['socket']}   (JSON Lines: docs/protocol.md)")
        print(f"  ikosd's log     {paths['log']}")
        print(f"  state           {paths['state']}")
        print(f"  ikosd's output  {self.console}")
        metrics = re.search(r"metrics (http://\S+)", self.ready)
        if metrics:
            print(f"  metrics         {metrics.group(1)}   (Prometheus text format)")
        print(f"  Grafana         {REPO / 'grafana'}   (provisioning/ and dashboards/: README.md)")
        print(f"  syslog socket   {paths['syslog']}   (logger --socket PATH MESSAGE)")
        print("\n  Try, from another terminal in this directory:")
        for command in try_commands(root):
            print(f"    {command}")
        print(flush=True)


def ikos_paths(root: Path) -> dict[str, Path]:
    """The files of an instance under ``root`` (as ikosd lays them out)."""
    from ikos.platform._paths import InstancePaths

    paths = InstancePaths.for_root(root)
    return {
        "socket": paths.control_socket,
        "log": paths.log_dir / "ikosd.log",
        "state": paths.state_dir,
        "syslog": paths.run_dir / "log.sock",
    }


def try_commands(root: str) -> list[str]:
    """ikosctl commands worth trying on the demo (each one a valid command line)."""
    ctl = f".venv/bin/ikosctl --root {shlex.quote(root)}"
    return [
        f"{ctl} list",
        f"{ctl} tree --deps",
        f'{ctl} call log \'{{"op": "query", "level": "info", "limit": 5}}\'',
        f"{ctl} subscribe 'dev.#'     # then plug a device in, or write to a uevent file",
        f'{ctl} call net \'{{"op": "routes"}}\'',
        f"{ctl} logs -n 20 auth",
        f"{ctl} status store",
        f"{ctl} call counter incr",
        f'{ctl} call store \'["get", "greeting"]\'',
        f"{ctl} call worker crash          # an exception in receive: a restart",
        f"{ctl} restart workers",
        f"{ctl} stop counter",
        f"{ctl} --json tree",
        f"{ctl} shutdown",
    ]


def heading(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


class OutputClosed(Exception):
    """The reader of the demo's output went away (``make demo | head``)."""


def _output_closed() -> bool:
    """Whether stdout is a pipe whose reader has closed it.

    A pipe's write end polls POLLERR once its read end is closed: that tells
    an ikosctl that failed because it could not write from one that failed
    on its own.
    """
    poller = select.poll()
    try:
        poller.register(sys.stdout.fileno(), 0)
    except (OSError, ValueError):  # no stdout at all
        return True
    return any(event & (select.POLLERR | select.POLLNVAL) for _, event in poller.poll(0))


def _quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo", description="Run the ikos demo system."
    )
    parser.add_argument("--root", default=".demo", help="the instance root (default .demo)")
    parser.add_argument(
        "--once",
        action="store_true",
        help="shut down after the tour even on a terminal",
    )
    args = parser.parse_args(argv)
    demo = Demo(Path(args.root))
    signal.signal(signal.SIGTERM, _interrupt)
    status = 1
    try:
        ready = demo.start()
        print(ready, flush=True)
        demo.tour()
        demo.where_to_look()
        if sys.stdin.isatty() and not args.once:
            print(
                "ikosd runs in the foreground: press Ctrl-C to stop it "
                "(or run the shutdown command above).",
                flush=True,
            )
            assert demo.proc is not None
            status = demo.proc.wait()
            print(f"ikosd exited with status {status}", flush=True)
            return status
        print("Shutting down (run on a terminal without --once to keep it running).", flush=True)
        demo.show("shutdown")
        status = demo.stop(signal_it=False)
        print(f"ikosd exited with status {status}", flush=True)
        return status
    except KeyboardInterrupt:
        print("\nStopping ikosd...", flush=True)
        status = demo.stop()
        print(f"ikosd exited with status {status}", flush=True)
        return status
    except (OutputClosed, BrokenPipeError):
        # `make demo | head`: the reader has what it wanted. Say so where it can
        # still be read, stop ikosd (below), and do not call it a failure.
        with contextlib.suppress(OSError):
            print(
                "demo: the output was closed (by `head`?): stopping ikosd",
                file=sys.stderr,
                flush=True,
            )
        # Python would report the closed stdout again when it flushes it at exit.
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        return 0
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        if demo.proc is not None and demo.proc.poll() is None:
            demo.stop()
        return 1
    finally:
        # Whatever happened, leave no ikosd behind (a no-op once it exited).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if demo.proc is not None and demo.proc.poll() is None:
            demo.stop()


if __name__ == "__main__":
    sys.exit(main())
