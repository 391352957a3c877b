"""Supervision-tree examples: one small runnable tree per idea.

Each module defines ``tree``, an :class:`ikos.Supervisor`, and runs with
``ikosd --root DIR --tree examples.trees.NAME:tree`` from the top of the
checkout (``health_check`` is a configuration file: ``ikosd --root DIR -c
examples/trees/health_check.toml``). ``docs/examples.md`` walks through each:
what to run, what to kill, what you will see; ``tests/test_docs_walkthroughs.py``
runs those walkthroughs as written.
"""
