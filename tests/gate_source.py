"""The opening of the actor modules of tests/test_proxy.py and tests/test_futures.py.

Imports and ``wait_gate(path)``: an actor that must be busy at a known moment
waits for a gate file the test creates, so the test knows what is queued
without sleeping.
"""

GATE_SOURCE = """
import os
import time

import ikos


def wait_gate(path):
    deadline = time.monotonic() + 120  # the test's own waits fail long before
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate {path} never opened")
        time.sleep(0.005)
"""
