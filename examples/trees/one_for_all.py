"""``one_for_all``: when one child dies, all of them are restarted together.

A cache, a loader that fills it and an API in front of both: they only make
sense together (the loader's work is lost with the cache, the API holds
handles into both), so a crash of any one restarts the three. The others
are stopped in reverse start order, then all start again in order.
"""

from __future__ import annotations

import ikos
from examples.actors import Crashy

tree = ikos.Supervisor(
    "root",
    strategy="one_for_one",
    max_restarts=3,
    within=60,
    children=[
        # The three under a supervisor of their own: the root also holds ikosd's
        # own supervisor (ikos-system, the IPC broker), which a one_for_all root
        # would restart along with them.
        ikos.Supervisor(
            "app",
            strategy="one_for_all",
            # One failure restarting three children counts once against the intensity.
            max_restarts=3,
            within=60,
            children=[
                ikos.Child("cache", Crashy),
                ikos.Child("loader", Crashy, requires=["cache"]),
                ikos.Child("api", Crashy, requires=["loader"]),
            ],
        ),
    ],
)
