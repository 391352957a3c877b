"""Dynamic children: ``simple_one_for_one`` runs instances of one template, added at run time.

``jobs`` starts empty. Each ``ikos.start_child("jobs", ARGS...)`` starts one
more instance of the template ``job`` (named ``job.1``, ``job.2``, ...), its
constructor called with the template's ``args`` plus ARGS. The template is
``transient``: an instance that crashes is restarted with the same
arguments; one that finishes (a clean exit) is done and removed.
``ikos.terminate_child(NAME)`` stops and removes one.
"""

from __future__ import annotations

import os

import ikos


class Job(ikos.Actor):
    """One job: knows what it works on; ``"crash"`` crashes it, ``"done"`` ends it."""

    def __init__(self, target: str) -> None:
        self.target = target

    def receive(self, message: object) -> object:
        if message == "crash":
            raise RuntimeError(f"job on {self.target} crashed")
        if message == "done":
            self.stop()  # a clean exit: a transient child is not restarted
            return f"{self.target}: done"
        return f"{self.target}: working (pid {os.getpid()})"


tree = ikos.Supervisor(
    "root",
    strategy="one_for_one",
    max_restarts=3,
    within=60,
    children=[
        ikos.Supervisor(
            "jobs",
            strategy="simple_one_for_one",
            max_restarts=5,
            within=60,
            children=[ikos.Child("job", Job, restart="transient")],
        ),
    ],
)
