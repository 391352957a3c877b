"""Shared pieces of the benchmarks: timing statistics, a results table, machine facts.

Benchmarks measure ikos side by side with its peers in one run, report
ratios, and write a Markdown table plus the raw figures as JSON under
``bench/results/``. They are never tests: this machine is shared and noisy,
so figures go to a table for people to read, not to assertions.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_us(samples: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean of samples in seconds, given in microseconds."""
    return {
        "p50_us": percentile(samples, 50) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
        "mean_us": statistics.fmean(samples) * 1e6,
    }


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


@dataclass
class Table:
    """Rows of (metric, ikos, peer values...) written as Markdown and JSON."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))

    def markdown(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
            return str(v)

        lines = [
            f"## {self.title}",
            "",
            f"Measured {machine()['date']} on "
            f"{machine()['cpus']} CPUs, Python {machine()['python']}, "
            f"Linux {machine()['kernel']}.",
            "",
        ]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def write(self, name: str) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        md = RESULTS / f"{name}.md"
        md.write_text(self.markdown())
        (RESULTS / f"{name}.json").write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "title": self.title,
                    "columns": self.columns,
                    "rows": self.rows,
                    "raw": self.raw,
                },
                indent=2,
                default=str,
            )
        )
        return md


class IkosInstance:
    """A real ikosd running ``tree_source`` (a module defining ``tree``) in a temporary root."""

    def __init__(
        self,
        tree_source: str,
        prefix: str = "ikos-bench-",
        *,
        config: str | None = None,
        metrics: str = "off",
    ) -> None:
        """``config``: the text of an ikos.toml added to the tree (``-c``); ``metrics``
        the ``--metrics`` address (``127.0.0.1:0`` for a free port)."""
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        (self.dir / "benchtree.py").write_text(tree_source)
        self.root = self.dir / "root"
        extra: list[str] = []
        if config is not None:
            (self.dir / "ikos.toml").write_text(config)
            extra = ["-c", str(self.dir / "ikos.toml")]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ikos.manager._ikosd",
                "--root",
                str(self.root),
                "--tree",
                f"{self.dir / 'benchtree.py'}:tree",
                *extra,
                "--metrics",
                metrics,
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.close()
            raise RuntimeError(f"ikosd did not start: {line!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
