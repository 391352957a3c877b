"""``/metrics`` over HTTP: the Prometheus text format, written for a large tree.

prometheus_client's writer (``generate_latest``) sorts and escapes every
label of every sample and checks each sample's name against three suffixes;
with 500 daemons (8,800 series) that was 37 of a scrape's 55 ms, over the
50 ms the monitoring issue asks for. This writer produces the same text
format (version 0.0.4: counters' ``_total`` names in HELP and TYPE, ``info``
as a gauge, ``_created`` samples as gauges of their own), escaping a label
value only when it holds a character that needs it, and keeping the labels
in the order the collector gave them (the format does not ask for an order).

The server is the standard library's threading HTTP server (a thread per
scrape, daemon threads), serving ``/metrics`` (and ``/``), gzipped at level 1
when the scraper accepts gzip (Prometheus does): level 9 cost more than it
saved on loopback. OpenMetrics is not offered: Prometheus asks for it first
but takes the text format, and the text format is what ``promtool check
metrics`` reads.
"""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from ikos.monitor._text import TextFamily, _escape, _value

__all__ = ["CONTENT_TYPE", "MetricsServer", "TextFamily", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: samples that the text format shows as families of their own (OpenMetrics-only series)
_SPLIT_SUFFIXES = ("_created", "_gsum", "_gcount")

_TYPES = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "gaugehistogram": "histogram",
    "summary": "summary",
    "info": "gauge",
    "stateset": "gauge",
    "unknown": "untyped",
}


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _line(name: str, labels: dict[str, str], value: float, timestamp: Any) -> str:
    if labels:
        inner = ",".join([f'{k}="{_escape(v)}"' for k, v in labels.items()])
        head = f"{name}{{{inner}}}"
    else:
        head = name
    text = _value(value)
    if timestamp is not None:
        return f"{head} {text} {int(float(timestamp) * 1000):d}\n"
    return f"{head} {text}\n"


def render(families: Iterable[Metric | TextFamily]) -> bytes:
    """The text exposition of ``families`` (a registry's ``collect()``)."""
    out: list[str] = []
    append = out.append
    for metric in families:
        name, kind = metric.name, metric.type
        shown = f"{name}_total" if kind == "counter" else name
        if kind == "info":
            shown = f"{name}_info"
        append(f"# HELP {shown} {_escape_help(metric.documentation)}\n")
        append(f"# TYPE {shown} {_TYPES.get(kind, 'untyped')}\n")
        if isinstance(metric, TextFamily):
            out.extend(metric.lines)
            continue
        split: dict[str, list[str]] = {}
        for s in metric.samples:
            sname = s.name
            if sname.endswith(_SPLIT_SUFFIXES) and sname[len(name) :] in _SPLIT_SUFFIXES:
                split.setdefault(sname[len(name) :], []).append(
                    _line(sname, s.labels, s.value, s.timestamp)
                )
                continue
            append(_line(sname, s.labels, s.value, s.timestamp))
        for suffix, lines in sorted(split.items()):
            append(f"# HELP {name}{suffix} {_escape_help(metric.documentation)}\n")
            append(f"# TYPE {name}{suffix} gauge\n")
            out.extend(lines)
    return "".join(out).encode()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.0"  # one scrape per connection, as Prometheus does

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = render(self.server.registry.collect())
        except Exception as exc:  # a collector's bug: an error, never a dead server
            self.send_error(500, f"collecting metrics failed: {type(exc).__name__}")
            return
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
        if gzipped:
            body = gzip.compress(body, compresslevel=1)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


class MetricsServer(ThreadingHTTPServer):
    """Serves ``registry`` at ``/metrics`` on ``host:port`` (port 0: any free port)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self.registry = registry
        # the family of the address given (an IPv6 literal, a name resolving to one)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
        self.address_family = infos[0][0]
        super().__init__((host, port), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="ikos-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the socket."""
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
