"""ikosd's own text writer and HTTP server for ``/metrics`` (ikos/monitor/_exposition.py).

The writer replaced prometheus_client's for speed; these tests hold it to
the same output: every family, sample, label (escaped) and value parses
back the same, counters keep their ``_total`` names in HELP and TYPE, and
OpenMetrics-only samples (``_created``) become families of their own.
"""

from __future__ import annotations

import gzip
import http.client
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus import promtool_check_metrics
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from ikos.monitor._exposition import CONTENT_TYPE, MetricsServer, TextFamily, render


class Odd:
    """Families with every case the writer special-cases."""

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily("odd_gauge", 'help with \\ and\nnewline "quoted"', labels=["a", "b"])
        g.add_metric(['q"x\\y\nz', "2"], 3.5)
        g.add_metric(["p", "q"], 0)
        g.add_metric(["r", "s"], -0.0)
        g.add_metric(["inf", "s"], float("inf"))
        yield g
        c = CounterMetricFamily("odd_events", "events", labels=["d"])
        c.add_metric(["x"], 12)
        c.add_metric(["y"], 1e21)
        yield c
        h = HistogramMetricFamily("odd_seconds", "latency", labels=["d"])
        h.add_metric(["x"], [("0.1", 2), ("1.0", 4), ("+Inf", 5)], 1.25)
        yield h
        yield GaugeMetricFamily("odd_nan", "not a number", value=float("nan"))


def registry() -> CollectorRegistry:
    # fixed values only (a ProcessCollector's CPU time moved between two renders)
    reg = CollectorRegistry()
    reg.register(Odd())  # type: ignore[arg-type]
    Counter("odd_client_counter", "one with _created", registry=reg).inc(3)
    return reg


def parsed(text: str) -> list[tuple[str, str, list[tuple[str, list[tuple[str, str]], str]]]]:
    return sorted(
        (
            f.name,
            f.type,
            sorted((s.name, sorted(s.labels.items()), repr(s.value)) for s in f.samples),
        )
        for f in text_string_to_metric_families(text)
    )


def test_the_writer_says_what_prometheus_clients_says() -> None:
    reg = registry()
    ours = render(reg.collect()).decode()
    theirs = generate_latest(reg).decode()
    assert parsed(ours) == parsed(theirs)
    # the HELP and TYPE lines themselves, in the family order of the registry
    assert [x for x in ours.splitlines() if x.startswith("#")] == [
        x for x in theirs.splitlines() if x.startswith("#")
    ]
    assert 'odd_gauge{a="q\\"x\\\\y\\nz",b="2"} 3.5' in ours
    assert 'odd_events_total{d="y"} 1e+21' in ours
    promtool_check_metrics(ours)


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    srv = MetricsServer("127.0.0.1", 0, registry())
    yield srv
    srv.close()


def get(srv: MetricsServer, path: str, headers: dict[str, str] | None = None) -> Any:
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def test_the_server_serves_metrics_plain_and_gzipped(server: MetricsServer) -> None:
    response, plain = get(server, "/metrics")
    assert response.status == 200
    assert response.getheader("Content-Type") == CONTENT_TYPE
    assert b"odd_events_total" in plain
    response, packed = get(server, "/metrics?x=1", {"Accept-Encoding": "gzip, deflate"})
    assert response.getheader("Content-Encoding") == "gzip"
    assert parsed(gzip.decompress(packed).decode()) == parsed(plain.decode())
    response, _ = get(server, "/nothing")
    assert response.status == 404


def test_a_collector_that_fails_is_a_500_and_the_server_lives_on(server: MetricsServer) -> None:
    class Broken:
        def collect(self) -> Iterator[Any]:
            raise RuntimeError("a bug")
            yield  # pragma: no cover

    server.registry.register(Broken())  # type: ignore[arg-type]
    response, _ = get(server, "/metrics")
    assert response.status == 500
    response, _ = get(server, "/")
    assert response.status == 500  # still answering, still failing the same way


def test_text_families_say_what_prometheus_clients_families_say() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()

    class Ours:
        def collect(self) -> Iterator[Any]:
            g = TextFamily("t_gauge", "gauge", "g", ["a", "b"])
            g.add(['q"x\\y\nz', "2"], 3.5)
            g.add(["p", "q"], -0.0)
            c = TextFamily("t_events", "counter", "c", ["d"])
            c.add(["x"], 12)
            h = TextFamily("t_seconds", "histogram", "h", ["d"])
            h.add_histogram(["x"], [("0.1", 2.0), ("+Inf", 5.0)], 1.25)
            bare = TextFamily("t_bare", "histogram", "no labels")
            bare.add_histogram([], [("+Inf", 1.0)], 0.5)
            yield from (g, c, h, bare)

    class Theirs:
        def collect(self) -> Iterator[Any]:
            g = GaugeMetricFamily("t_gauge", "g", labels=["a", "b"])
            g.add_metric(['q"x\\y\nz', "2"], 3.5)
            g.add_metric(["p", "q"], -0.0)
            c = CounterMetricFamily("t_events", "c", labels=["d"])
            c.add_metric(["x"], 12)
            h = HistogramMetricFamily("t_seconds", "h", labels=["d"])
            h.add_metric(["x"], [("0.1", 2.0), ("+Inf", 5.0)], 1.25)
            bare = HistogramMetricFamily("t_bare", "no labels")
            bare.add_metric([], [("+Inf", 1.0)], 0.5)
            yield from (g, c, h, bare)

    ours.register(Ours())  # type: ignore[arg-type]
    theirs.register(Theirs())  # type: ignore[arg-type]
    text = render(ours.collect()).decode()
    assert parsed(text) == parsed(generate_latest(theirs).decode())
    promtool_check_metrics(text)
