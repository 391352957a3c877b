"""Draw the benchmarks' figures as PNG plots under ``bench/results/`` (``make bench`` ends here).

It reads only the JSON the benchmarks wrote (``results/NAME.json``), never
measures: ``python -m bench.plot`` redraws every plot from the last run's
figures. Two kinds of plot:

- cost against size, for the benchmarks with a count axis: ``monitoring.png``
  (the sampler's CPU, its cost per pass against its peers, the scrape
  latency and size, against the number of daemons), ``exec.png`` (start-up
  of 50 and 500 executables per manager), ``pubsub.png`` (deliveries against
  subscribers), ``queues.png`` (puts against producers);
- ``NAME_ratios.png`` for every table with ratio columns (``X / Y``): one bar
  per row and ratio, on a log scale around 1, so that ikos's standing against
  its floor and peers reads at a glance (what is better, above or below 1,
  is in the column's name: see NAME.md).

matplotlib (the ``plot`` extra) runs with the Agg backend: no display needed.
A result file that is missing is skipped, so that one benchmark's plots can
be drawn alone.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend is chosen first

from bench._common import RESULTS

Figure = Any


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save(fig: Figure, name: str) -> Path:
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def subtitle(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    return f"{m.get('date', '?')}, {m.get('cpus', '?')} CPUs, Python {m.get('python', '?')}"


# -- cost against size -------------------------------------------------------------


def monitoring(doc: dict[str, Any]) -> Figure:
    runs = doc["raw"]["by_daemons"]
    interval = doc["raw"]["interval"]
    n = [r["daemons"] for r in runs]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    fig.suptitle(f"Monitoring: cost against the number of daemons ({subtitle(doc)})")

    a = ax[0][0]
    med = [r["sampling_cpu_pct"] for r in runs]
    lo = [m - min(r["sampling_cpu_pct_windows"]) for m, r in zip(med, runs, strict=True)]
    hi = [max(r["sampling_cpu_pct_windows"]) - m for m, r in zip(med, runs, strict=True)]
    a.errorbar(
        n,
        med,
        yerr=[lo, hi],
        marker="o",
        capsize=3,
        label="ikosd, on - off (mean, range of windows)",
    )
    a.plot(n, [r["pass_cpu_pct_at_interval"] for r in runs], marker="s", label="Sampler.sample")
    a.axhline(2.0, color="red", linestyle="--", label="goal: 2 %")
    a.set(
        xlabel="daemons", ylabel="% of a core", title=f"sampling CPU at a {interval:g} s interval"
    )
    a.legend(fontsize="small", loc="lower right")

    a = ax[0][1]
    for name in runs[0]["pass_cpu_ms"]:
        a.plot(n, [r["pass_cpu_ms"][name] for r in runs], marker="o", label=name)
    a.set(
        xlabel="daemons", ylabel="ms of CPU per pass", yscale="log", title="one pass: ikos, peers"
    )
    a.legend(fontsize="small")

    a = ax[1][0]
    a.plot(n, [r["scrape_p50_ms"] for r in runs], marker="o", label="p50")
    a.plot(n, [r["scrape_p95_ms"] for r in runs], marker="s", label="p95")
    if "scrape_prometheus_p50_ms" in runs[0]:
        a.plot(
            n,
            [r["scrape_prometheus_p50_ms"] for r in runs],
            marker="^",
            label="p50 as Prometheus asks (OpenMetrics, gzip)",
        )
    a.axhline(50.0, color="red", linestyle="--", label="goal: 50 ms")
    a.set(xlabel="daemons", ylabel="ms", title="scrape of /metrics")
    a.legend(fontsize="small")

    a = ax[1][1]
    a.plot(n, [r["metrics_bytes"] / 1024 for r in runs], marker="o", color="C0")
    a.set(xlabel="daemons", ylabel="KiB", title="/metrics size and series")
    b = a.twinx()
    b.plot(n, [r["series"] for r in runs], marker="s", color="C1")
    b.set_ylabel("series", color="C1")
    a.set_ylabel("KiB", color="C0")
    return fig


def exec_(doc: dict[str, Any]) -> Figure:
    managers = [c for c in doc["columns"][2:-1] if "/" not in c]
    col = {c: i for i, c in enumerate(doc["columns"])}
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    fig.suptitle(f"Executables: start-up against their number ({subtitle(doc)})")
    for a, what in zip(
        ax, ("start {} to running", "launch manager with {} to all running"), strict=True
    ):
        rows = {}
        for row in doc["rows"]:
            for size in (50, 500):
                if str(row[0]).startswith(what.format(size)):
                    rows[size] = row
        if len(rows) < 2:
            continue
        for m in managers:
            a.plot([50, 500], [rows[s][col[m]] for s in (50, 500)], marker="o", label=m)
        a.set(xlabel="executables", ylabel="ms", xscale="log", yscale="log", title=what.format("N"))
        _count_ticks(a, [50, 500])
        a.legend(fontsize="small")
    return fig


def by_count(
    doc: dict[str, Any], title: str, xlabel: str, ylabel: str, series: list[str]
) -> Figure:
    """One line per column in ``series`` against the first column, an integer count."""
    col = {c: i for i, c in enumerate(doc["columns"])}
    rows = [r for r in doc["rows"] if isinstance(r[0], int)]
    fig, a = plt.subplots(figsize=(6.5, 4.5))
    x = [r[0] for r in rows]
    for name in series:
        a.plot(x, [_number(r[col[name]]) for r in rows], marker="o", label=name)
    a.set(xlabel=xlabel, ylabel=ylabel, xscale="log", title=f"{title}\n{subtitle(doc)}")
    _count_ticks(a, x)
    a.legend(fontsize="small")
    return fig


def pubsub(doc: dict[str, Any]) -> Figure:
    return by_count(
        doc,
        "Publish/subscribe: deliveries against subscribers",
        "subscribers",
        "deliveries/s",
        ["floor (deliveries/s)", "broker (deliveries/s)"],
    )


def queues(doc: dict[str, Any]) -> Figure:
    return by_count(
        doc,
        "Durable queues: puts against producers",
        "producers",
        "puts/s",
        [c for c in doc["columns"] if "puts/s" in c],
    )


# -- ratios ----------------------------------------------------------------------------


def ratios(doc: dict[str, Any]) -> Figure | None:
    """Bars of every ratio column (``X / Y``, or ``ratio``) of every row; None if none."""
    cols = [(i, c) for i, c in enumerate(doc["columns"]) if i > 0 and ("/" in c or c == "ratio")]
    if doc["title"].startswith("Monitoring"):  # its ratios are rows, one column per count
        cols = [(i, c) for i, c in enumerate(doc["columns"]) if c.endswith("daemons")]
        rows = [r for r in doc["rows"] if str(r[0]).endswith("/ ikos")]
    else:
        rows = doc["rows"]
    bars: list[tuple[str, str, float]] = []
    for row in rows:
        for i, c in cols:
            v = _number(row[i])
            if v is not None and v > 0:
                label = c if c != "ratio" else f"{doc['columns'][i - 1]} ratio"
                bars.append((str(row[0]), label, v))
    if not bars:
        return None
    labels = list(dict.fromkeys(b[1] for b in bars))
    metrics = list(dict.fromkeys(b[0] for b in bars))
    height = 0.8 / len(labels)
    fig, a = plt.subplots(figsize=(10, 1.2 + 0.35 * len(metrics) * max(1, len(labels) / 2)))
    for k, label in enumerate(labels):
        ys, vs = [], []
        for b in bars:
            if b[1] == label:
                ys.append(metrics.index(b[0]) + k * height)
                vs.append(b[2])
        a.barh(ys, vs, height=height, label=label)
    a.set_yticks([m + 0.4 - height / 2 for m in range(len(metrics))])
    a.set_yticklabels([_short(m) for m in metrics], fontsize="small")
    a.invert_yaxis()
    a.axvline(1.0, color="black", linewidth=0.8)
    a.set(xscale="log", xlabel="ratio (log scale; the column's name says which way is better)")
    a.set_title(f"{doc['title']}: ratios\n{subtitle(doc)}", fontsize="medium")
    a.legend(fontsize="x-small", loc="best")
    return fig


def _count_ticks(a: Any, counts: list[int]) -> None:
    """Ticks at the measured counts only, written plainly (not 10^k) on a log axis."""
    a.set_xticks(counts, [str(c) for c in counts])
    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _number(v: Any) -> float | None:
    return (
        float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else None
    )


def _short(text: str, width: int = 55) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


PLOTS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "monitoring": monitoring,
    "exec": exec_,
    "pubsub": pubsub,
    "queues": queues,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="results to draw (default: every results/*.json)")
    args, _ = p.parse_known_args(argv)
    names = args.names or sorted(f.stem for f in RESULTS.glob("*.json"))
    for name in names:
        doc = load(name)
        if doc is None:
            print(f"  no results/{name}.json: skipped")
            continue
        if name in PLOTS:
            print(f"  {save(PLOTS[name](doc), name)}")
        fig = ratios(doc)
        if fig is not None:
            print(f"  {save(fig, f'{name}_ratios')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
