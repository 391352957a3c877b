"""An executable beside actors: any program is a child like an actor.

``clock`` is a plain shell loop printing the time; ``announcer``, an actor,
needs it (``requires``), so it starts once ``clock`` runs and, under
``rest_for_one``, is restarted when ``clock`` dies. What ``clock`` prints
goes to its log (``ikosctl logs clock``). The supervisor treats both kinds
alike: restart type, strategy, intensity, shutdown timeout.
"""

from __future__ import annotations

import ikos
from examples.actors import Echo

tree = ikos.Supervisor(
    "root",
    strategy="rest_for_one",
    max_restarts=3,
    within=60,
    children=[
        ikos.Exec(
            "clock",
            "/bin/sh",
            args=["-c", "while true; do date -u +'tick %H:%M:%S'; sleep 1; done"],
            shutdown=2.0,
        ),
        ikos.Child("announcer", Echo, requires=["clock"]),
    ],
)
