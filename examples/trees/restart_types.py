"""Restart types: which exits a supervisor answers with a restart.

- ``permanent`` is always restarted, even after a clean exit;
- ``transient`` is restarted only after an abnormal exit (a crash, a kill),
  and stays stopped after a clean one: a job that finished;
- ``temporary`` is never restarted: a one-shot task whose failure is
  reported, not retried.

Each child is the same ``Crashy`` actor: ``ikosctl call NAME stop`` makes it
exit cleanly, ``ikosctl call NAME crash`` raises in ``receive`` (a crash).
"""

from __future__ import annotations

import ikos
from examples.actors import Crashy

tree = ikos.Supervisor(
    "root",
    strategy="one_for_one",
    max_restarts=5,
    within=60,
    children=[
        ikos.Child("always", Crashy, restart="permanent"),
        ikos.Child("on-crash", Crashy, restart="transient"),
        ikos.Child("never", Crashy, restart="temporary"),
    ],
)
