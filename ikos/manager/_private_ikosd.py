"""The private ikosd of ``ikos.local()``: the child's side of :mod:`ikos.manager._local`.

``python -m ikos.manager._private_ikosd --root DIR --tree-file FILE --lifeline FD``
runs the manager on the tree the parent wrote (read once, then deleted) until
the lifeline, the read end of a pipe whose write end only the parent holds,
reaches end of file: the parent closed its block, or died. Then it shuts down
as on SIGTERM, and with ``--remove-root`` removes the temporary root itself,
so that a parent killed with SIGKILL leaves nothing behind either.

The lifeline's watcher is a thread that sends SIGTERM to its own process, again
every half second until the process ends: a SIGTERM that comes before the
manager installed its handler is swallowed by the one installed here first,
and ikosd ignores repeats once its shutdown began.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ikos._codec import decode
from ikos.manager._ikosd import _serve, setup_logging
from ikos.platform._asyncio_tls import import_asyncio_without_tls
from ikos.platform._paths import InstancePaths

#: Seconds between the watcher's SIGTERMs once the lifeline ended.
RESEND = 0.5


def watch_lifeline(fd: int) -> None:
    """Block until the pipe ``fd`` ends, then keep asking this process to stop."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    while True:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(RESEND)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the private ikosd; see the module docstring."""
    import_asyncio_without_tls()  # as ikosd's main: no OpenSSL until an https check
    import asyncio

    from ikos.manager._extension import Config

    p = argparse.ArgumentParser(prog="ikos-local")
    p.add_argument("--root", required=True)
    p.add_argument("--tree-file", required=True)
    p.add_argument("--lifeline", type=int, required=True)
    p.add_argument("--remove-root", action="store_true")
    args = p.parse_args(argv)
    # until the manager's handler replaces it: an early SIGTERM must not kill
    # ikosd before it can stop what it started (the watcher sends it again)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    os.set_inheritable(args.lifeline, False)
    threading.Thread(
        target=watch_lifeline, args=(args.lifeline,), name="lifeline", daemon=True
    ).start()
    paths = InstancePaths.for_root(args.root)
    try:
        setup_logging("info", paths.log_dir, terminal_level="warning")
        tree_file = Path(args.tree_file)
        tree = decode(tree_file.read_bytes())  # the parent's own file: its tree, not a peer's
        tree_file.unlink()
        from ikos.manager._manager import Manager

        manager = Manager(paths, Config(tree), ready_line=False)
        # as ikosd's main: once the manager is done, its signal handlers (which post
        # to its loop) give way to SIG_IGN before the loop closes
        return asyncio.run(_serve(manager))
    except Exception as exc:
        print(f"ikosd (local): {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the watcher's repeats, from now on
        if args.remove_root:
            shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
