"""``one_for_one``: a child that dies is restarted alone; its siblings never notice.

Three independent workers. Kill one and only that one gets a new process;
the other two keep their PIDs. This is the default strategy, the one for
children that share nothing.
"""

from __future__ import annotations

import ikos
from examples.actors import Crashy

tree = ikos.Supervisor(
    "root",
    strategy="one_for_one",
    # Up to 3 restarts in 60 s; a 4th within the minute would make the root give up.
    max_restarts=3,
    within=60,
    children=[
        ikos.Child("a", Crashy),
        ikos.Child("b", Crashy),
        ikos.Child("c", Crashy),
    ],
)
