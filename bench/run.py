"""Run every benchmark (``make bench``): actors, executables, registry, IPC; tables in results/."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    "bench.actors",
    "bench.exec",
    "bench.registry",
    "bench.ipc",
    "bench.pubsub",
    "bench.queues",
    "bench.shm",
)


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        print(f"== {module}", flush=True)
        if subprocess.call([sys.executable, "-m", module, *sys.argv[1:]]) != 0:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
