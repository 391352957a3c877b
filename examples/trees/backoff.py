"""Back-off: a child that keeps failing is restarted after growing delays.

``db-client`` cannot connect (its ``on_start`` raises, as a client of a
database that is down would), so every start fails. Without back-off its
supervisor would restart it at once, exhaust its intensity in milliseconds
and give up; with ``ikos.Backoff`` the n-th consecutive restart waits
``min * 2**n`` seconds (here 1, 2, 4, 8, 8, ... with no random part, so that
the walkthrough shows round numbers), during which the child is in state
``backoff``. A generous intensity (20 restarts in 10 minutes) lets the
back-off do the pacing. Once the database is back the child would run, and
after ``reset_after`` seconds of running the delay starts again from ``min``.
"""

from __future__ import annotations

import ikos


class DbClient(ikos.Actor):
    """Fails to start: the database it needs is down."""

    def on_start(self) -> None:
        raise ConnectionRefusedError("cannot reach the database at 127.0.0.1:5432")

    def receive(self, message: object) -> object:
        return message


tree = ikos.Supervisor(
    "root",
    strategy="one_for_one",
    max_restarts=20,
    within=600,
    children=[
        ikos.Child(
            "db-client",
            DbClient,
            backoff=ikos.Backoff(min=1, max=8, random_factor=0, reset_after=30),
        ),
    ],
)
