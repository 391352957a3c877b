"""Monitoring benchmark: what sampling daemons and serving ``/metrics`` cost ikosd.

Run with ``make bench`` (or ``python -m bench.monitoring``). For N daemons
(half actors, half ``sleep infinity`` executables) it starts two real ikosd
side by side, one sampling at the default ``[monitor] interval`` and one
that samples once at start and then every day (``interval = 86400``: the
sampler has no off switch, and needs none for this), and measures:

- the sampling cost as ikosd pays it: ikosd's CPU time (user + system, from
  ``/proc/PID/stat``) over the same windows in both, the difference as % of
  a core; both instances see the same noise of this shared machine;
- the same cost in-process: the CPU time of :meth:`Sampler.sample` over the
  same daemons, and, on those daemons again, the obvious alternatives: the
  psutil pass ikos used before (``oneshot()``, sessions from one scan), a
  naive psutil loop (no ``oneshot``, ``children(recursive=True)`` per
  daemon) and one ``ps`` per pass (which cannot give fds, I/O nor USS);
- a scrape of ``/metrics``: latency (median, p95 of plain HTTP GETs), size and
  number of series.

The goals (issue 9): sampling under 2 % of a core and a scrape under 50 ms
at 500 daemons. Figures go to results/monitoring.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import statistics
import subprocess
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
from prometheus_client.utils import floatToGoString

from bench._common import IkosInstance, Table, percentile
from ikos.manager._config import MonitorSettings
from ikos.monitor._sampler import Sampler, Target
from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths
from ikos.platform._process import all_pids, proc_info

COUNTS = (50, 100, 250, 500)
INTERVAL = MonitorSettings().interval
USS_EVERY = MonitorSettings().uss_every
#: the instance that does not sample: one pass at start, then none for a day
NEVER = 86400
GOAL_CPU_PCT = 2.0
GOAL_SCRAPE_MS = 50.0

TREE = textwrap.dedent(
    """
    import ikos

    class Idle(ikos.Actor):
        def receive(self, message):
            return message

    def tree():
        actors = [ikos.Child(f"a{{i}}", Idle) for i in range({actors})]
        sleepers = [
            ikos.Exec(f"s{{i}}", "/bin/sleep", args=["infinity"]) for i in range({execs})
        ]
        return ikos.Supervisor("root", children=actors + sleepers)
    """
)


def config(interval: float) -> str:
    """The ikos.toml of an instance sampling every ``interval`` seconds."""
    return f"[monitor]\ninterval = {interval}\n"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (threads included), from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(n: int, interval: float) -> IkosInstance:
    """An ikosd with ``n`` daemons sampled every ``interval`` s, once all of them run."""
    inst = IkosInstance(
        TREE.format(actors=n // 2, execs=n - n // 2),
        prefix="ikos-bench-mon-",
        config=config(interval),
        metrics="127.0.0.1:0",
    )
    deadline = time.monotonic() + 300
    while len(running(inst)) < n:
        if time.monotonic() > deadline:
            inst.close()
            raise RuntimeError(f"{n} daemons not running after 300 s")
        time.sleep(0.2)
    return inst


def running(inst: IkosInstance) -> list[Target]:
    """The running daemons of ``inst`` and their main pids, from its control socket."""
    with contextlib.closing(ControlClient(InstancePaths.for_root(inst.root), timeout=60)) as c:
        rows = c.call("status")
    return [
        Target(r["name"], r["pid"])
        for r in rows
        if r.get("kind") != "supervisor" and r.get("state") == "running" and r.get("pid")
    ]


def metrics_address(inst: IkosInstance) -> tuple[str, int]:
    """Where ``inst`` serves ``/metrics``: its ``RUN/metrics.json`` (file_sd) says."""
    document = json.loads((inst.root / "run" / "ikos" / "metrics.json").read_text())
    host, port = document[0]["targets"][0].rsplit(":", 1)
    return host, int(port)


def cpu_windows(on: int, off: int, windows: int, seconds: float) -> tuple[list[float], list[float]]:
    """ikosd's CPU, % of a core, of the sampling and the idle instance over the same windows."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(windows):
        t0, on0, off0 = time.monotonic(), cpu_seconds(on), cpu_seconds(off)
        time.sleep(seconds)
        dt = time.monotonic() - t0
        a.append((cpu_seconds(on) - on0) / dt * 100)
        b.append((cpu_seconds(off) - off0) / dt * 100)
    return a, b


#: what Prometheus 2.x/3.x sends with a scrape: it takes OpenMetrics when offered, gzipped
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "Accept-Encoding": "gzip",
}


def timed_gets(
    address: tuple[str, int], n: int, headers: dict[str, str] | None = None
) -> tuple[list[float], bytes]:
    """``n`` GETs of ``/metrics`` over fresh connections (as Prometheus's scrapes are), each
    read whole: seconds each, and the last body."""
    times: list[float] = []
    body = b""
    for _ in range(n):
        t = time.perf_counter()
        conn = http.client.HTTPConnection(*address, timeout=30)
        conn.request("GET", "/metrics", headers=headers or {})
        body = conn.getresponse().read()
        conn.close()
        times.append(time.perf_counter() - t)
    return times, body


def exposition_cost(body: bytes, repeats: int = 5) -> dict[str, float]:
    """ms to render the scraped families: prometheus_client's writer, and a plain one.

    The families are parsed back from a scrape and rendered in this process,
    so both writers render exactly what ikosd served: how much of a scrape is
    prometheus_client's text writer, and what a plain f-string writer of the
    same text (label names known valid, values escaped) would take instead.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(body.decode()))

    class Fixed:
        def collect(self) -> Any:
            return families

    registry = CollectorRegistry()
    registry.register(Fixed())  # type: ignore[arg-type]
    out = {}
    for name, render in (
        ("prometheus_client", lambda: generate_latest(registry)),
        ("plain", lambda: plain_exposition(families)),
    ):
        render()
        t = time.perf_counter()
        for _ in range(repeats):
            render()
        out[name] = (time.perf_counter() - t) / repeats * 1e3
    return out


def plain_exposition(families: Sequence[Any]) -> bytes:
    """The Prometheus text format of ``families`` by plain string formatting."""
    parts = []
    for f in families:
        doc = f.documentation.replace("\\", r"\\").replace("\n", r"\n")
        kind = "untyped" if f.type == "unknown" else f.type
        parts.append(f"# HELP {f.name}{'_total' if kind == 'counter' else ''} {doc}\n")
        parts.append(f"# TYPE {f.name}{'_total' if kind == 'counter' else ''} {kind}\n")
        for sample in f.samples:
            if sample.labels:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels.items())
                parts.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}\n")
            else:
                parts.append(f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(parts).encode()


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def series(body: bytes) -> tuple[int, int]:
    """Series in a text exposition: all of them, and the per-daemon ones (``ikos_daemon_``)."""
    lines = [ln for ln in body.decode().splitlines() if ln and not ln.startswith("#")]
    return len(lines), sum(ln.startswith("ikos_daemon_") for ln in lines)


# -- passes over the daemons' processes: ikos's, and the alternatives -----------------


def pass_cost(one_pass: Callable[[int], Any], passes: int, warm_up: bool = False) -> list[float]:
    """CPU seconds of each of ``passes`` calls ``one_pass(i)``, i from 1 (this thread and any
    child); with ``warm_up``, after an untimed ``one_pass(0)``."""
    if warm_up:
        one_pass(0)
    out = []
    for i in range(1, passes + 1):
        c0 = time.thread_time()
        k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        one_pass(i)
        k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out.append(
            time.thread_time() - c0 + (k1.ru_utime - k0.ru_utime) + (k1.ru_stime - k0.ru_stime)
        )
    return out


def ikos_pass(targets: Sequence[Target]) -> Callable[[int], Any]:
    """ikos's sampler as ikosd runs it (the default USS cycle)."""
    sampler = Sampler(uss=True, uss_every=USS_EVERY)
    return lambda _i: sampler.sample(targets)


def _psutil_figures(p: psutil.Process, uss: bool) -> tuple[float, ...]:
    times = p.cpu_times()
    memory = p.memory_full_info() if uss else p.memory_info()
    io = p.io_counters()
    return (
        times.user + times.system,
        memory.rss,
        getattr(memory, "uss", 0),
        p.num_fds(),
        p.num_threads(),
        io.read_bytes,
        io.write_bytes,
    )


def psutil_oneshot_pass(targets: Sequence[Target]) -> Callable[[int], Any]:
    """ikos's sampler before it read /proc itself: psutil under oneshot(), sessions by scan."""

    def run(i: int) -> Any:
        sessions: dict[int, list[int]] = {}
        for pid in all_pids():
            info = proc_info(pid)
            if info is not None:
                sessions.setdefault(info.sid, []).append(pid)
        out = []
        for t in targets:
            for pid in sessions.get(os.getsid(t.pid), []):
                with contextlib.suppress(psutil.Error, OSError):
                    p = psutil.Process(pid)
                    with p.oneshot():
                        p.status()
                        p.create_time()
                        out.append(_psutil_figures(p, i % USS_EVERY == 0))
        return out

    return run


def psutil_naive_pass(targets: Sequence[Target]) -> Callable[[int], Any]:
    """The obvious loop: each daemon's process tree by children(recursive=True), no oneshot."""

    def run(i: int) -> Any:
        out = []
        for t in targets:
            with contextlib.suppress(psutil.Error):
                main = psutil.Process(t.pid)
                for p in [main, *main.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        out.append(_psutil_figures(p, i % USS_EVERY == 0))
        return out

    return run


def ps_pass(targets: Sequence[Target]) -> Callable[[int], Any]:
    """One ``ps`` per pass, summed by session: CPU time, RSS, threads (no fds, I/O, USS)."""
    wanted = {os.getsid(t.pid) for t in targets}

    def run(_i: int) -> Any:
        text = subprocess.run(
            ["ps", "-e", "-o", "sess=,cputimes=,rss=,nlwp="],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        out: dict[int, list[int]] = {}
        for line in text.splitlines():
            sid, cpu, rss, threads = (int(v) for v in line.split())
            if sid in wanted:
                row = out.setdefault(sid, [0, 0, 0])
                row[0] += cpu
                row[1] += rss
                row[2] += threads
        return out

    return run


PEERS = (
    ("psutil oneshot (ikos before)", psutil_oneshot_pass),
    ("psutil naive", psutil_naive_pass),
    ("ps", ps_pass),
)


def measure(n: int, windows: int, window: float, passes: int, scrape_n: int) -> dict[str, Any]:
    """Every figure for ``n`` daemons (see the module docstring), as one JSON-able dict."""
    on = start(n, INTERVAL)
    try:
        off = start(n, NEVER)
        try:
            time.sleep(1.0)  # both past their start-up (and their first pass)
            cpu_on, cpu_off = cpu_windows(on.proc.pid, off.proc.pid, windows, window)
        finally:
            off.close()
        before = cpu_seconds(on.proc.pid)
        times, body = timed_gets(metrics_address(on), scrape_n)
        scrape_cpu = (cpu_seconds(on.proc.pid) - before) / scrape_n
        total, per_daemon = series(body)
        prom_times, _ = timed_gets(metrics_address(on), max(5, scrape_n // 2), PROMETHEUS_HEADERS)
        writers = exposition_cost(body)
        targets = running(on)
        # ikos's first pass reads the USS of every process, new to it: not a steady pass
        views = {"ikos": pass_cost(ikos_pass(targets), passes, warm_up=True)}
        for name, peer in PEERS:
            views[name] = pass_cost(peer(targets), passes)
    finally:
        on.close()
    sampling = [a - b for a, b in zip(cpu_on, cpu_off, strict=True)]
    return {
        "daemons": n,
        "ikosd_cpu_on_pct": cpu_on,
        "ikosd_cpu_off_pct": cpu_off,
        # the mean, not the median: the windows together span one USS cycle (USS_EVERY
        # passes), and the window holding the USS pass costs more by design, not by noise
        "sampling_cpu_pct": statistics.fmean(sampling),
        "sampling_cpu_pct_windows": sampling,
        "pass_cpu_ms": {k: statistics.fmean(v) * 1e3 for k, v in views.items()},
        "pass_cpu_ms_samples": {k: [x * 1e3 for x in v] for k, v in views.items()},
        "pass_cpu_pct_at_interval": statistics.fmean(views["ikos"]) / INTERVAL * 100,
        "scrape_p50_ms": percentile(times, 50) * 1e3,
        "scrape_p95_ms": percentile(times, 95) * 1e3,
        "scrape_cpu_ms": scrape_cpu * 1e3,
        "scrape_prometheus_p50_ms": percentile(prom_times, 50) * 1e3,
        "scrape_prometheus_p95_ms": percentile(prom_times, 95) * 1e3,
        "exposition_ms": writers,
        "metrics_bytes": len(body),
        "series": total,
        "daemon_series": per_daemon,
    }


def table(results: list[dict[str, Any]]) -> Table:
    """One row per figure, one column per number of daemons; goals judged at the largest."""
    ns = [r["daemons"] for r in results]
    t = Table(
        "Monitoring: the sampler's cost and the /metrics scrape against the number of daemons",
        ["metric", "goal", *(f"{n} daemons" for n in ns), "goal met"],
    )
    last = results[-1]

    def row(label: str, key: Callable[[dict[str, Any]], Any], goal: str = "-", met: str = "-"):
        t.add(label, goal, *(key(r) for r in results), met)

    def yes(ok: bool) -> str:
        return "yes" if ok else "**no**"

    row(
        f"ikosd CPU on sampling, mean of windows (% of a core, interval {INTERVAL:g} s)",
        lambda r: r["sampling_cpu_pct"],
        f"< {GOAL_CPU_PCT:g} % at 500",
        yes(last["sampling_cpu_pct"] < GOAL_CPU_PCT),
    )
    row(
        "ikosd CPU, sampling instance, mean (% of a core)",
        lambda r: statistics.fmean(r["ikosd_cpu_on_pct"]),
    )
    row(
        "ikosd CPU, instance sampling daily, mean (% of a core)",
        lambda r: statistics.fmean(r["ikosd_cpu_off_pct"]),
    )
    row(
        "Sampler.sample CPU per pass, in-process (ms)",
        lambda r: r["pass_cpu_ms"]["ikos"],
    )
    row(
        f"  the same as % of a core at {INTERVAL:g} s",
        lambda r: r["pass_cpu_pct_at_interval"],
        f"< {GOAL_CPU_PCT:g} % at 500",
        yes(last["pass_cpu_pct_at_interval"] < GOAL_CPU_PCT),
    )
    for name, _ in PEERS:
        row(f"{name}: CPU per pass (ms)", lambda r, k=name: r["pass_cpu_ms"][k])
        same = name != "ps"  # ps reads fewer figures: no goal against it
        row(
            f"{name} / ikos",
            lambda r, k=name: r["pass_cpu_ms"][k] / r["pass_cpu_ms"]["ikos"],
            "> 1" if same else "-",
            yes(last["pass_cpu_ms"][name] > last["pass_cpu_ms"]["ikos"]) if same else "-",
        )
    row(
        "scrape /metrics p50 (ms)",
        lambda r: r["scrape_p50_ms"],
        f"< {GOAL_SCRAPE_MS:g} ms at 500",
        yes(last["scrape_p50_ms"] < GOAL_SCRAPE_MS),
    )
    row(
        "scrape /metrics p95 (ms)",
        lambda r: r["scrape_p95_ms"],
        f"< {GOAL_SCRAPE_MS:g} ms at 500",
        yes(last["scrape_p95_ms"] < GOAL_SCRAPE_MS),
    )
    row("ikosd CPU per scrape (ms)", lambda r: r["scrape_cpu_ms"])
    row(
        "scrape as Prometheus asks (OpenMetrics, gzip) p50 (ms)",
        lambda r: r["scrape_prometheus_p50_ms"],
    )
    row(
        "scrape as Prometheus asks (OpenMetrics, gzip) p95 (ms)",
        lambda r: r["scrape_prometheus_p95_ms"],
    )
    row(
        "rendering the scraped text: prometheus_client (ms)",
        lambda r: r["exposition_ms"]["prometheus_client"],
    )
    row("rendering it: a plain writer (ms)", lambda r: r["exposition_ms"]["plain"])
    row(
        "prometheus_client / plain writer",
        lambda r: r["exposition_ms"]["prometheus_client"] / r["exposition_ms"]["plain"],
    )
    row("/metrics size (KiB)", lambda r: r["metrics_bytes"] / 1024)
    row("/metrics series (all / ikos_daemon_*)", lambda r: f"{r['series']} / {r['daemon_series']}")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default=",".join(map(str, COUNTS)), help="numbers of daemons")
    p.add_argument("--windows", type=int, default=3, help="CPU windows per count")
    p.add_argument(  # together, the windows span one USS cycle
        "--window", type=float, default=USS_EVERY * INTERVAL / 3, help="seconds per CPU window"
    )
    p.add_argument("--passes", type=int, default=USS_EVERY, help="timed passes per view")
    p.add_argument("--scrapes", type=int, default=50)
    p.add_argument("--name", default="monitoring", help="results/NAME.md and .json")
    args, _ = p.parse_known_args(argv)  # make bench passes the same arguments to all
    load = os.getloadavg()
    results = []
    started = time.monotonic()
    for n in (int(c) for c in args.counts.split(",")):
        print(f"  {n} daemons", flush=True)
        results.append(measure(n, args.windows, args.window, args.passes, args.scrapes))
    t = table(results)
    spread = results[-1]["sampling_cpu_pct_windows"]
    t.notes += [
        f"Daemons: half actors (an ikos.Actor that answers messages), half `/bin/sleep infinity`"
        f" executables, all idle. Interval: the default [monitor] interval, {INTERVAL:g} s, USS"
        f" every {USS_EVERY} passes (the defaults).",
        "ikosd CPU on sampling: two ikosd run side by side with the same daemons, one at the"
        f" default interval and one with interval = {NEVER} (it samples once at start); over"
        f" {args.windows} windows of {args.window:g} s, each window's CPU (user + system of the"
        " ikosd process, /proc/PID/stat, 10 ms ticks) of the first minus that of the second;"
        f" the mean, as the windows together span one cycle of {USS_EVERY} passes, one of which"
        " also reads every process's USS. At the largest count the windows gave "
        + ", ".join(f"{v:.2f}" for v in spread)
        + " %: the one with the USS pass stands out; besides, the machine is shared (2"
        " cores, other jobs): read the figures as +- a few tenths of a percent.",
        f"In-process: the CPU time of each of {args.passes} passes over the same daemons (for"
        f" ikos after a first one, which reads every USS), USS read on every {USS_EVERY}th"
        " pass as by default; the mean. The"
        " peers read the same figures (CPU, RSS, USS, fds, threads, I/O) of the same"
        " processes, except `ps` (CPU time, RSS, threads: it has no fds, I/O nor USS); its"
        " figure includes the ps process's CPU. Ratios are peer / ikos: above 1, ikos is"
        " cheaper.",
        "psutil oneshot (ikos before): the sampler as it was before it read /proc itself"
        " (psutil.Process.oneshot() per process; sessions from one scan of /proc).",
        f"Scrapes: {args.scrapes} GETs of /metrics, one fresh connection each, from this"
        " process (Python http.client) to the sampling instance after its windows.",
        "No node_exporter or process-exporter is installed here: not compared.",
        f"Load average (1/5/15 min) {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} before the run,"
        + " {:.1f}/{:.1f}/{:.1f} after; the run took {:.0f} s.".format(
            *os.getloadavg(), time.monotonic() - started
        ),
    ]
    t.raw = {"interval": INTERVAL, "uss_every": USS_EVERY, "by_daemons": results}
    print(t.write(args.name).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
