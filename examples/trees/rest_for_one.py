"""``rest_for_one``: the child that died and every child started after it restart.

A pipeline: ``ingest`` feeds ``parse``, which feeds ``store``. When ``parse``
dies, ``store`` (which depended on it) is restarted too, but ``ingest``,
started before it, keeps running untouched. With ``requires``, "after" means
after in the start order the dependencies give, across the whole tree.
"""

from __future__ import annotations

import ikos
from examples.actors import Crashy

tree = ikos.Supervisor(
    "root",
    strategy="rest_for_one",
    max_restarts=3,
    within=60,
    children=[
        ikos.Child("ingest", Crashy),
        ikos.Child("parse", Crashy, requires=["ingest"]),
        ikos.Child("store", Crashy, requires=["parse"]),
    ],
)
