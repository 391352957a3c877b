"""Restart intensity and escalation: a supervisor that gives up fails to its parent.

``flaky`` allows 1 restart of its children in 60 seconds. A second crash of
``worker`` within the minute exceeds that: ``flaky`` stops its children and
fails, and its parent, ``root``, handles that like any child's crash:
``flaky`` is permanent, so root restarts it, with a fresh ``worker``. Root
allows 1 restart in 60 s as well, so when ``flaky`` gives up a second time
root gives up too, and ikosd stops everything and exits with status 1.
``steady``, root's other child, is stopped with the rest only then.
"""

from __future__ import annotations

import ikos
from examples.actors import Crashy

tree = ikos.Supervisor(
    "root",
    strategy="one_for_one",
    max_restarts=1,
    within=60,
    children=[
        ikos.Child("steady", Crashy),
        ikos.Supervisor(
            "flaky",
            strategy="one_for_one",
            max_restarts=1,
            within=60,
            children=[ikos.Child("worker", Crashy)],
        ),
    ],
)
