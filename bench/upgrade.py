"""Hot code upgrade: the gap in service it causes, and the ask round trip around it.

Run with ``python -m bench.upgrade``. One client thread asks the actor
without pause while the main thread upgrades it ``--upgrades`` times (the
module rewritten each time, a small state handed over); the gap of one
upgrade is the longest time between two consecutive replies while it runs:
the old incarnation's last reply to the new one's first, plus one round
trip. Every reply is checked to come in order (a counter that must go up
by one), so a lost message shows as an error, not as a figure. The ask
round trip (p50 of ``--asks`` sequential asks) is measured before the first
upgrade and after the last: the handover must leave the hot path alone.
``--asks-only`` measures only the round trip (to compare with a version of
ikos without upgrades, put first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import IkosInstance, percentile

TREE = textwrap.dedent(
    """
    import sys

    sys.path.insert(0, {where!r})
    import ikos

    def tree():
        return ikos.Supervisor("root", children=[ikos.Child("counter", "gapmod:Counter")])
    """
)

MODULE = textwrap.dedent(
    """
    import ikos

    class Counter(ikos.Actor):
        version = {version}

        def __init__(self):
            self.count = 0

        def receive(self, message):
            self.count += 1
            return self.count

        def get_state(self):
            return self.count

        def set_state(self, state):
            self.count = state
    """
)


def ask_p50(ref: object, n: int) -> float:
    ask = ref.ask  # type: ignore[attr-defined]
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        ask("x")
        samples.append(time.perf_counter() - t)
    return percentile(samples, 50)


def upgrade_gaps(upgrades: int, asks: int = 0) -> dict[str, Any]:
    """Upgrade a counter ``upgrades`` times under one client asking without pause.

    Returns ``gaps`` (seconds, one per upgrade), ``replies`` (how many were
    checked in order), ``errors`` (replies out of order: lost messages), and
    with ``asks`` the ask round trip p50 ``before`` and ``after``.
    """
    import ikos

    # the actor's module lives apart from the tree, on a path the tree adds
    staging = Path(tempfile.mkdtemp(prefix="ikos-bench-upgrade-"))
    (staging / "gapmod.py").write_text(MODULE.format(version=1))
    inst = IkosInstance(TREE.format(where=str(staging)))
    out: dict[str, Any] = {}
    try:
        ref = ikos.ActorRef("counter", root=inst.root)
        ref.ask("x")
        if asks:
            out["before"] = ask_p50(ref, asks)
        if not upgrades:
            return out
        replies: list[float] = []
        errors: list[str] = []
        stop = threading.Event()

        def client() -> None:
            r = ikos.ActorRef("counter", root=inst.root)
            last = r.ask("x")
            while not stop.is_set():
                n = r.ask("x", timeout=30)
                replies.append(time.perf_counter())
                if n != last + 1:
                    errors.append(f"reply {n} after {last}")
                last = n

        t = threading.Thread(target=client)
        t.start()
        gaps = []
        try:
            for version in range(2, upgrades + 2):
                (staging / "gapmod.py").write_text(MODULE.format(version=version))
                time.sleep(0.05)  # a stream of replies before the upgrade starts
                start = len(replies)
                began = time.perf_counter()
                report = ikos.upgrade("counter", root=inst.root)
                ended = time.perf_counter()
                time.sleep(0.05)
                window = [began] + [x for x in replies[start:] if began <= x <= ended + 0.05]
                gaps.append(max(b - a for a, b in itertools.pairwise(window)))
                assert report["state"] == "handed over", report
        finally:
            stop.set()
            t.join(60)
        out.update(gaps=gaps, replies=len(replies), errors=errors)
        if asks:
            out["after"] = ask_p50(ref, asks)
        return out
    finally:
        inst.close()
        shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrades", type=int, default=20)
    parser.add_argument("--asks", type=int, default=5000)
    parser.add_argument("--asks-only", action="store_true")
    opts = parser.parse_args()
    res = upgrade_gaps(0 if opts.asks_only else opts.upgrades, opts.asks)
    print(f"ask round trip p50 before: {res['before'] * 1e6:.1f} us ({opts.asks} asks)")
    if opts.asks_only:
        return
    ms = [g * 1e3 for g in res["gaps"]]
    print(
        f"upgrade gap over {len(ms)} upgrades: median {statistics.median(ms):.2f} ms, "
        f"max {max(ms):.2f} ms; replies checked in order: {res['replies']}, "
        f"errors: {len(res['errors'])}"
    )
    print(f"ask round trip p50 after: {res['after'] * 1e6:.1f} us ({opts.asks} asks)")
    if res["errors"]:
        print("\n".join(res["errors"][:10]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
