"""Run every benchmark (``make bench``): actors, executables, registry, IPC, monitoring;
tables in results/, then their plots (bench/plot.py) from those tables."""

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
    "bench.monitoring",
    "bench.ray",  # skips itself where Ray is not installed (the ray extra)
)


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        print(f"== {module}", flush=True)
        if subprocess.call([sys.executable, "-m", module, *sys.argv[1:]]) != 0:
            failed.append(module)
    print("== bench.plot", flush=True)  # from whatever results there are, failed or not
    if subprocess.call([sys.executable, "-m", "bench.plot"]) != 0:
        failed.append("bench.plot")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
