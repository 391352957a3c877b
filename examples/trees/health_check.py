"""A health check that restarts a daemon: a hung process is failed and restarted.

A crash is easy to see: the process exits. A daemon that hangs (a deadlock,
an endless loop, a stopped process) still runs, and only a check from
outside notices. ``api`` answers the ``method`` check of
``health_check.toml`` (ikosd asks it ``{"ikos.health": "healthy"}`` every
second); when two answers in a row do not come within the timeout, the check
is ``critical`` and, with ``on_failure = "restart"``, ikosd fails the daemon:
stop signal, shutdown timeout, SIGKILL, and its supervisor restarts it as
after a crash (restart type, intensity and back-off apply).

Health checks are declared in a configuration file, so this example is run
with ``ikosd --root DIR -c examples/trees/health_check.toml``; the file names
this class by its import path.
"""

from __future__ import annotations

import ikos
import ikos.registry


class Api(ikos.Actor):
    """Answers any request with itself, and the health check with ``"ok"``."""

    def healthy(self) -> str:
        return "ok"

    def receive(self, message: object) -> object:
        method = ikos.registry.health_request(message)
        if method == "healthy":
            return self.healthy()
        return message
